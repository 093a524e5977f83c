"""schemathesis hooks of the API fuzz (tests/tests/api_fuzz.rs).

The OpenAPI document says everything about a request that JSON Schema can say. A few rules of
the server relate values in a way it cannot, and the document states them in words:

- the CIDRs of one universe must not overlap each other, and its IPv6 CIDRs must not be
  multicast (ff00::/8), link-local (fe80::/10) or within ::/64 (a pattern cannot say that of
  every way an IPv6 address is written);
- a rule's from_port must not be above its to_port;
- a token's expires, shaped as the pattern says, must be a real date (no February 30th) in the
  future and at most 10 years away, or a lifetime above zero and at most 10 years;
- the since of the audit trail and of flow logs, shaped as the pattern says, must be a real date;
- the host of a trace or of flow logs must be a host of the fleet (the fuzz's one host,
  `VERSE_FUZZ_HOST`);
- a trace (GET /v1/trace) takes port only for tcp and udp (6, 17), and requires it there, sport
  only for them, icmp_type and icmp_code only for icmp (1), and a universe when neither from
  nor to is an endpoint id.

A request breaking one of them is a 400 however valid its parts are. These hooks keep such
requests out of the generated data, so that a request the fuzz counts as valid is valid, and any
400 it gets is a real disagreement between the document and the server. (They drop invalid
requests as well as valid ones: that only leaves some invalid requests unsent.) The coverage
phase does not pass its requests through the filters, so `filter_failure` drops the one failure
such a request can cause ("schema-valid request rejected") when, and only when, the request
breaks one of these rules.

The fuzz acts as the admin, with a token. Schemathesis reuses ids it has seen in responses (the
token list holds the fuzz's own): `before_call` turns a revocation of the fuzz's own token
(`VERSE_FUZZ_TOKEN_ID`) into one of a token that does not exist, which answers 404, so that the
rest of the fuzz is not answered 401.
"""
import datetime
import ipaddress
import os
import re

import schemathesis

# What the document's pattern for times allows (controller/src/openapi.rs, time()).
_RFC3339 = re.compile(
    r"^([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]{1,9})?Z$"
)
_SPAN = re.compile(r"^(0|[1-9][0-9]{0,8})([smhdwy])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
# The longest lifetime of a token, and a margin around the bounds of expires so that the clock
# moving while a request is sent decides nothing.
_TEN_YEARS = 10 * 366 * 86400
_MARGIN = 3600


def _time(text):
    """("at", datetime) or ("span", seconds) for a time the server parses, else None."""
    if not isinstance(text, str):
        return None
    m = _RFC3339.match(text)
    if m:
        year, month, day, hour, minute, second = (int(g) for g in m.groups())
        if year < 1970:
            return None
        try:
            at = datetime.datetime(
                year, month, day, hour, minute, min(second, 59), tzinfo=datetime.timezone.utc
            )
        except ValueError:
            return None
        return ("at", at)
    total = 0
    for part in text.split(" "):
        m = _SPAN.match(part)
        if not m:
            return None
        total += int(m.group(1)) * _UNIT[m.group(2)]
    return ("span", total)


def _good_expiry(text):
    t = _time(text)
    if t is None:
        return False
    if t[0] == "span":
        seconds = t[1]
    else:
        seconds = (t[1] - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    return _MARGIN < seconds < _TEN_YEARS - _MARGIN


def _overlapping(cidrs):
    nets = []
    for text in cidrs:
        if not isinstance(text, str):
            return False
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            return False
    return any(
        a.version == b.version and a.overlaps(b)
        for i, a in enumerate(nets)
        for b in nets[i + 1 :]
    )


def _unusable_ipv6(cidrs):
    for text in cidrs:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except (TypeError, ValueError):
            continue
        first = int(net.network_address)
        if net.version == 6 and (
            first >> 120 == 0xFF or first >> 118 == 0xFE80 >> 6 or first >> 64 == 0
        ):
            return True
    return False


def _body_breaks_a_rule(operation, body):
    if not isinstance(body, dict) or operation is None:
        return False
    path, method = operation.path, operation.method.upper()
    if method == "POST" and path == "/v1/universes":
        cidrs = body.get("cidrs")
        if isinstance(cidrs, list) and _overlapping(cidrs):
            return True
        cidrs6 = body.get("ipv6_cidrs")
        if isinstance(cidrs6, list) and (_overlapping(cidrs6) or _unusable_ipv6(cidrs6)):
            return True
    if method == "POST" and path == "/v1/security-groups/{id}/rules":
        low, high = body.get("from_port"), body.get("to_port")
        if isinstance(low, int) and isinstance(high, int) and low > high:
            return True
    if method == "POST" and path == "/v1/tokens":
        if isinstance(body.get("expires"), str) and not _good_expiry(body["expires"]):
            return True
    return False


def _query_breaks_a_rule(operation, query):
    if not isinstance(query, dict) or operation is None:
        return False
    if operation.method.upper() == "GET" and operation.path in ("/v1/audit", "/v1/flow-logs"):
        since = query.get("since")
        if isinstance(since, str) and _time(since) is None:
            return True
    if operation.method.upper() == "GET" and operation.path in ("/v1/trace", "/v1/flow-logs"):
        host = query.get("host")
        if host is not None and host != os.environ.get("VERSE_FUZZ_HOST"):
            return True
    if operation.method.upper() == "GET" and operation.path == "/v1/trace":
        return _trace_breaks_a_rule(query)
    return False


def _trace_breaks_a_rule(query):
    protocol = str(query.get("protocol", "")).lower()
    ported = protocol in ("tcp", "udp", "6", "17")
    icmp = protocol in ("icmp", "1")
    if ported and "port" not in query:
        return True
    if not ported and ("port" in query or "sport" in query):
        return True
    if not icmp and ("icmp_type" in query or "icmp_code" in query):
        return True
    by_id = any(str(query.get(f, "")).startswith("ep-") for f in ("from", "to"))
    return not by_id and "universe" not in query


@schemathesis.hook
def filter_body(context, body):
    return not _body_breaks_a_rule(context.operation, body)


@schemathesis.hook
def filter_query(context, query):
    return not _query_breaks_a_rule(context.operation, query)


@schemathesis.hook
def filter_failure(context, failure, case, response):
    if getattr(failure, "code", None) != "ST202":
        return True
    return not (
        _body_breaks_a_rule(case.operation, case.body)
        or _query_breaks_a_rule(case.operation, case.query)
    )


@schemathesis.hook
def before_call(context, case, **kwargs):
    own = os.environ.get("VERSE_FUZZ_TOKEN_ID")
    operation = case.operation
    if (
        own
        and operation.method.upper() == "DELETE"
        and operation.path == "/v1/tokens/{id}"
        and isinstance(case.path_parameters, dict)
        and case.path_parameters.get("id") == own
    ):
        case.path_parameters["id"] = "tok-00000000"
