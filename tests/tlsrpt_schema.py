"""RFC 8460 §4's aggregate report as a JSON Schema (the RFC gives it as an annotated example and
prose, §4.1-4.4; this is that, field by field), and a check of a report against it plus what a
schema cannot say (the summary's failures are the sum of the failure details)."""

from __future__ import annotations

import jsonschema

DATE_TIME = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"  # RFC 3339 §5.6
RESULT_TYPES = [  # §4.3 (and IANA's STARTTLS Validation Result Types)
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired", "certificate-not-trusted",
    "validation-failure", "tlsa-invalid", "dnssec-invalid", "dane-required", "sts-policy-fetch-error",
    "sts-policy-invalid", "sts-webpki-invalid",
]
_COUNT = {"type": "integer", "minimum": 0}
_IP = {"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["organization-name", "date-range", "contact-info", "report-id", "policies"],
    "properties": {
        "organization-name": {"type": "string", "minLength": 1},
        "date-range": {
            "type": "object", "additionalProperties": False, "required": ["start-datetime", "end-datetime"],
            "properties": {"start-datetime": {"type": "string", "pattern": DATE_TIME},
                           "end-datetime": {"type": "string", "pattern": DATE_TIME}},
        },
        "contact-info": {"type": "string", "minLength": 1},
        "report-id": {"type": "string", "minLength": 1},
        "policies": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["policy", "summary"],
            "properties": {
                "policy": {
                    "type": "object", "additionalProperties": False, "required": ["policy-type", "policy-domain"],
                    "properties": {
                        "policy-type": {"enum": ["tlsa", "sts", "no-policy-found"]},
                        "policy-string": {"type": "array", "items": {"type": "string"}},
                        "policy-domain": {"type": "string", "minLength": 1},
                        "mx-host": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "summary": {
                    "type": "object", "additionalProperties": False,
                    "required": ["total-successful-session-count", "total-failure-session-count"],
                    "properties": {"total-successful-session-count": _COUNT, "total-failure-session-count": _COUNT},
                },
                "failure-details": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False, "required": ["result-type", "failed-session-count"],
                    "properties": {
                        "result-type": {"enum": RESULT_TYPES},
                        "sending-mta-ip": _IP,
                        "receiving-mx-hostname": {"type": "string", "minLength": 1},
                        "receiving-mx-helo": {"type": "string"},
                        "receiving-ip": _IP,
                        "failed-session-count": _COUNT,
                        "additional-information": {"type": "string", "format": "uri"},
                        "failure-reason-code": {"type": "string"},
                    },
                }},
            },
        }},
    },
}


def check_report(report: dict) -> None:
    """Raises if ``report`` is not a valid RFC 8460 report."""
    jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker()).validate(report)
    for item in report["policies"]:
        failed = sum(d["failed-session-count"] for d in item.get("failure-details", []))
        assert failed == item["summary"]["total-failure-session-count"], item
