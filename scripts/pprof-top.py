#!/usr/bin/env python3
"""Top functions (flat and cumulative) of a Go pprof CPU profile (gzipped profile.proto).

    scripts/pprof-top.py PROFILE [FLAT_ROWS [CUMULATIVE_ROWS]]

For VictoriaMetrics' own profile (`/debug/pprof/profile?seconds=N`, see scripts/bench-ship.sh
DIDHUB_STORE_PPROF): the Debian binary has no ELF symbols for `perf`, but its pprof profile
names every function. Reads the protobuf by hand (no Go toolchain or protobuf package needed).
"""
import gzip, sys, collections

def varint(b, i):
    r = s = 0
    while True:
        c = b[i]; i += 1
        r |= (c & 0x7f) << s; s += 7
        if c < 0x80: return r, i

def fields(b):
    i = 0
    while i < len(b):
        key, i = varint(b, i)
        f, t = key >> 3, key & 7
        if t == 0:
            v, i = varint(b, i)
        elif t == 2:
            n, i = varint(b, i); v = b[i:i+n]; i += n
        elif t == 1:
            v = b[i:i+8]; i += 8
        elif t == 5:
            v = b[i:i+4]; i += 4
        else:
            raise ValueError(t)
        yield f, t, v

def packed(t, v):
    if t == 0: return [v]
    out, i = [], 0
    while i < len(v):
        x, i = varint(v, i); out.append(x)
    return out

data = gzip.decompress(open(sys.argv[1], 'rb').read())
strings, funcs, locs, samples = [], {}, {}, []
for f, t, v in fields(data):
    if f == 6: strings.append(v.decode('utf-8', 'replace'))
    elif f == 5:
        d = {ff: vv for ff, tt, vv in fields(v)}
        funcs[d.get(1, 0)] = d.get(2, 0)
    elif f == 4:
        lid, fl = 0, []
        for ff, tt, vv in fields(v):
            if ff == 1: lid = vv
            elif ff == 4:
                dd = {a: c for a, _, c in fields(vv)}
                fl.append(dd.get(1, 0))
        locs[lid] = fl
    elif f == 2:
        ls, vals = [], []
        for ff, tt, vv in fields(v):
            if ff == 1: ls += packed(tt, vv)
            elif ff == 2: vals += packed(tt, vv)
        samples.append((ls, vals))
flat, cum = collections.Counter(), collections.Counter()
total = 0
for ls, vals in samples:
    w = vals[-1] if vals else 1
    total += w
    names = []
    for l in ls:
        for fid in locs.get(l, []):
            names.append(strings[funcs.get(fid, 0)])
    if names: flat[names[0]] += w
    for n in set(names): cum[n] += w
print(f"total {total/1e9:.2f} s of CPU in {len(samples)} stacks")
print("flat:")
for n, w in flat.most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 25):
    print(f"  {100*w/total:5.1f}%  {n}")
print("cumulative:")
for n, w in cum.most_common(int(sys.argv[3]) if len(sys.argv) > 3 else 40):
    print(f"  {100*w/total:5.1f}%  {n}")
