"""Who may call a gRPC service (submitd_common.callers), as a table: no server here; the real
services refusing real certificates are in tests/test_grpc_callers.py."""

import pytest

from submitd_common.callers import Callers

REWRITER = ["SubmitMany", "Submit", "Rewrite", "RewriteWhole"]
DEFAULT = ["frontend:SubmitMany", "frontend:Submit", "relay:Rewrite"]  # the rewriter's GRPC_ALLOWED_CALLERS


@pytest.mark.parametrize(
    "caller, method, permitted",
    [
        ("frontend", "/submitd.v1.Rewriter/SubmitMany", True),
        ("frontend", "/submitd.v1.Rewriter/Submit", True),
        ("frontend", "/submitd.v1.Rewriter/Rewrite", False),  # no signed message handed back
        ("frontend", "/submitd.v1.Rewriter/RewriteWhole", False),
        ("relay", "/submitd.v1.Rewriter/Rewrite", True),
        ("relay", "/submitd.v1.Rewriter/SubmitMany", False),
        ("relay", "/submitd.v1.Rewriter/RewriteWhole", False),
        ("policy", "/submitd.v1.Rewriter/Rewrite", False),
        ("Frontend", "/submitd.v1.Rewriter/SubmitMany", False),  # names are compared exactly
        (None, "/submitd.v1.Rewriter/Rewrite", False),  # a certificate without a commonName
        ("policy", "/grpc.health.v1.Health/Check", True),  # health: any certificate of the CA
        (None, "/grpc.health.v1.Health/Watch", True),
    ],
)
def test_the_rewriters_callers(caller, method, permitted):
    callers = Callers.parse(DEFAULT, REWRITER)
    assert callers.permits(caller, method) is permitted


def test_the_default_is_the_rewriters():
    from submitd_rewriter.settings import Settings

    assert Settings.model_fields["grpc_allowed_callers"].default == DEFAULT


def test_methods_add_up_and_a_name_alone_allows_every_method():
    callers = Callers.parse(["relay:Rewrite", "relay:RewriteWhole", "ops", "ops:Rewrite"], REWRITER)
    assert callers.allowed == {"relay": frozenset({"Rewrite", "RewriteWhole"}), "ops": None}
    assert callers.permits("ops", "/submitd.v1.Rewriter/SubmitMany")


def test_nobody_listed_nobody_permitted():
    assert not Callers.parse([], REWRITER).permits("frontend", "/submitd.v1.Rewriter/Rewrite")


@pytest.mark.parametrize("entry", ["relay:Rewirte", ":Rewrite", ""])
def test_a_misspelt_entry_is_refused_at_start(entry):
    with pytest.raises(ValueError):
        Callers.parse([entry], REWRITER)
