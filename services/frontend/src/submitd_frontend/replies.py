"""Every reply the frontend writes, each once: the code, the tests and the README name these.

Replies decided elsewhere (policy's verdicts, the rewriter's refusals, the backends' 4xx in
:mod:`.backends`) reach the client as those services word them.
"""

from __future__ import annotations

# -- the session ---------------------------------------------------------------------------
BYE = "221 2.0.0 Bye"
OK = "250 2.0.0 OK"
HELP = "214 2.0.0 See RFC 6409"
VRFY = "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"
EXPN = "502 5.5.1 EXPN not implemented"
TLS_READY = "220 2.0.0 Ready to start TLS"
TLS_ACTIVE = "503 5.5.1 TLS already active"
TLS_UNAVAILABLE = "454 4.7.0 TLS not available"
STARTTLS_SYNTAX = "501 5.5.4 Syntax: STARTTLS"

# -- closing (never 521: RFC 6409 §7) -------------------------------------------------------
DRAINING = "421 4.3.2 Service shutting down, try again later"
TOO_MANY_SESSIONS = "421 4.3.2 Too many sessions, try again later"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address"
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
TOO_MUCH_JUNK = "421 4.7.0 Too many commands without mail, closing connection"
TIMEOUT = "421 4.4.2 Timeout, closing connection"
SESSION_TOO_LONG = "421 4.4.2 Session time limit reached, closing connection"
DATA_TOO_SLOW = "421 4.4.2 Data rate too low, closing connection"
INTERNAL_ERROR = "451 4.3.0 Internal error, try again later"
TEMPORARY = "451 4.3.0 Temporary failure, try again later"

# -- command lines (RFC 5321 §2.3.8, §4.5.3.1.4) ---------------------------------------------
UNRECOGNIZED = "500 5.5.1 Command unrecognized"
LINE_TOO_LONG = "500 5.5.2 Line too long"
BARE_LINE_END = "500 5.5.2 Syntax error: bare CR or LF, or NUL, in command"
NOT_UTF8 = "500 5.5.2 Syntax error: invalid characters in command"
NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII characters require SMTPUTF8"
ADDRESS_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address requires SMTPUTF8"

# -- EHLO and AUTH (RFC 4954) ----------------------------------------------------------------
AUTH_OK = "235 2.7.0 Authentication successful"
NEED_EHLO = "503 5.5.1 Send EHLO first"
AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
ALREADY_AUTHENTICATED = "503 5.5.1 Already authenticated"
AUTH_IN_TRANSACTION = "503 5.5.1 AUTH not permitted during a mail transaction"
AUTH_SYNTAX = "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
BAD_BASE64 = "501 5.5.2 Cannot decode base64"
AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication Exchange line is too long"  # RFC 4954 §6

# -- the transaction ---------------------------------------------------------------------------
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
NEED_HELO = "503 5.5.1 Send EHLO/HELO first"
SENDER_GIVEN = "503 5.5.1 Sender already specified"
NEED_MAIL = "503 5.5.1 Need MAIL command"
MAIL_SYNTAX = "501 5.5.4 Syntax: MAIL FROM:<address> [parameters]"
RCPT_SYNTAX = "501 5.5.4 Syntax: RCPT TO:<address> [parameters]"
BAD_SENDER = "501 5.1.7 Bad sender address syntax"
BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax"
BAD_BODY = "501 5.5.4 BODY must be 7BIT or 8BITMIME"
SMTPUTF8_VALUE = "501 5.5.4 SMTPUTF8 takes no value"
REQUIRETLS_VALUE = "501 5.5.4 REQUIRETLS takes no value"
# RFC 8689 §2: REQUIRETLS is offered, and may be asked for, only on a TLS session. X.7.10
# "Encryption Needed" (RFC 5248's registry), 530 as for any command that needs STARTTLS first
# (RFC 3207 §4); not X.7.30, which is the relay's (no next hop offers REQUIRETLS).
REQUIRETLS_NEEDS_TLS = "530 5.7.10 REQUIRETLS needs an encrypted session: send STARTTLS first"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
NO_RECIPIENTS = "554 5.5.1 No valid recipients"
BAD_RET = "501 5.5.4 RET must be FULL or HDRS"
BAD_ENVID = "501 5.5.4 ENVID must be xtext of at most 100 printable characters"
BAD_NOTIFY = "501 5.5.4 NOTIFY must be NEVER or SUCCESS, FAILURE and DELAY"
BAD_ORCPT = "501 5.5.4 ORCPT must be addr-type;xtext of printable characters"

# -- message content (DATA, RFC 5321 §4.1.1.4; BDAT, RFC 3030) -------------------------------
START_DATA = "354 End data with <CR><LF>.<CR><LF>"
DATA_SYNTAX = "501 5.5.4 Syntax: DATA"
BDAT_SYNTAX = "501 5.5.4 Syntax: BDAT chunk-size [LAST]"
BDAT_ONLY = "503 5.5.1 Only BDAT, RSET, NOOP or QUIT during a BDAT transfer"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
NUL = "554 5.6.0 Message contains NUL octets"
BARE_CR_LF = "554 5.6.0 Message contains bare CR or LF characters"
NO_CRLF_AT_END = "554 5.6.0 Message does not end with CRLF"
TEXT_LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 §4.5.3.1.6)"


def greeting(hostname: str) -> str:
    return f"220 {hostname} ESMTP submitd"


def helo(hostname: str) -> str:
    return f"250 {hostname}"


def ehlo(lines: list[str]) -> str:
    return "\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}"


def challenge(b64: str) -> str:
    return f"334 {b64}"


def helo_syntax(verb: str) -> str:
    return f"501 5.5.4 Syntax: {verb} hostname"


def unsupported_parameter(command: str, name: str) -> str:
    return f"555 5.5.4 Unsupported {command} parameter {name}"


def repeated_parameter(command: str, name: str) -> str:
    return f"501 5.5.4 {command} parameter {name} given more than once"


def chunk_received(size: int) -> str:
    return f"250 2.0.0 {size} octets received"


def queued(queue_id: str) -> str:
    return f"250 2.0.0 Ok: queued as {queue_id}"
