#!/usr/bin/env python3
"""Small HTTP/1.1 keep-alive clients for bench/sidecar.sh (standard library only).

    httpload.py paired DIRECT_URL PROXY_URL PAIRS EXPECT [--header H] [--tokens FILE]
        One connection to each URL. PAIRS times: one request direct, one through the proxy
        (the order alternates from pair to pair), each timed on its own. Prints one line per
        pair, "direct_us<TAB>proxied_us", on stdout. Fails unless every direct answer is 200
        and every proxied answer has status EXPECT.

    httpload.py count URL COUNT EXPECT [--header H]
        COUNT requests over one connection, one after the other; fails unless every answer
        has status EXPECT. For a fixed-count load (instructions per request under callgrind).

--header "Name: value" adds a header to the proxied (or counted) requests; --tokens FILE
sends "Authorization: Bearer <next token of FILE>" instead, round robin.
"""
import argparse
import http.client
import sys
import time
import urllib.parse


def connect(url):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=30)
    return conn, (u.path or "/") + (f"?{u.query}" if u.query else "")


def timed_get(conn, path, headers):
    t0 = time.perf_counter_ns()
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    resp.read()
    t1 = time.perf_counter_ns()
    return resp.status, (t1 - t0) / 1000


def header_source(args):
    if args.tokens:
        with open(args.tokens) as f:
            tokens = [line.strip() for line in f if line.strip()]
        i = 0

        def next_headers():
            nonlocal i
            token = tokens[i % len(tokens)]
            i += 1
            return {"Authorization": f"Bearer {token}"}
        return next_headers
    fixed = {}
    if args.header:
        name, _, value = args.header.partition(":")
        fixed[name.strip()] = value.strip()
    return lambda: fixed


def paired(args):
    direct, direct_path = connect(args.direct)
    proxy, proxy_path = connect(args.proxy)
    headers = header_source(args)
    out = []
    for i in range(args.pairs):
        h = headers()
        if i % 2 == 0:
            ds, dt = timed_get(direct, direct_path, {})
            ps, pt = timed_get(proxy, proxy_path, h)
        else:
            ps, pt = timed_get(proxy, proxy_path, h)
            ds, dt = timed_get(direct, direct_path, {})
        if ds != 200 or ps != args.expect:
            sys.exit(f"pair {i}: direct answered {ds}, proxied {ps} (expected 200, {args.expect})")
        out.append(f"{dt:.1f}\t{pt:.1f}")
    print("\n".join(out))


def count(args):
    conn, path = connect(args.url)
    headers = header_source(args)
    for i in range(args.count):
        status, _ = timed_get(conn, path, headers())
        if status != args.expect:
            sys.exit(f"request {i}: answered {status}, expected {args.expect}")


parser = argparse.ArgumentParser()
sub = parser.add_subparsers(dest="mode", required=True)
p = sub.add_parser("paired")
p.add_argument("direct")
p.add_argument("proxy")
p.add_argument("pairs", type=int)
p.add_argument("expect", type=int)
c = sub.add_parser("count")
c.add_argument("url")
c.add_argument("count", type=int)
c.add_argument("expect", type=int)
for s in (p, c):
    s.add_argument("--header")
    s.add_argument("--tokens")
args = parser.parse_args()
paired(args) if args.mode == "paired" else count(args)
