"""What held device memory when CUDA ran out of it: a snapshot of torch's allocator history
(`HOMESTAR_MEMORY_SNAPSHOT=FILE homestar bench ...` writes one) replayed to its first
out-of-memory event, live bytes grouped by the homestar code that allocated them.

    python bench/oom_snapshot.py FILE [--top 25]

Only allocations inside the recorded window are known (bench records the last 200,000 events);
bytes freed on the host but still waiting for another stream's work ("pending") are shown apart,
as the allocator cannot hand them out yet either.
"""

from __future__ import annotations

import argparse
import pickle
from collections import defaultdict

MIB = float(1 << 20)


def site(frames: list[dict]) -> str:
    """The innermost two homestar frames of an allocation's stack (or its innermost frame)."""
    ours = [f for f in frames if "/homestar/" in f.get("filename", "")]
    if not ours:
        top = frames[0] if frames else {"filename": "?", "line": 0, "name": "?"}
        ours = [top]
    return " < ".join(f"{f['filename'].rsplit('/homestar/', 1)[-1]}:{f['line']} {f['name']}" for f in ours[:2])


def replay(trace: list[dict]):
    """Live and pending allocations (addr -> (size, site)) at the first OOM, and that event."""
    live, pending = {}, {}
    for entry in trace:
        action, addr = entry["action"], entry.get("addr")
        if action == "alloc":
            live[addr] = (entry["size"], site(entry.get("frames", [])))
        elif action == "free_requested":
            if addr in live:
                pending[addr] = live.pop(addr)
        elif action == "free_completed":
            live.pop(addr, None)
            pending.pop(addr, None)
        elif action == "oom":
            return live, pending, entry
    return live, pending, None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("snapshot")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    with open(args.snapshot, "rb") as f:
        snapshot = pickle.load(f)
    reserved = sum(s["total_size"] for s in snapshot["segments"])
    print(f"segments at the dump: {len(snapshot['segments'])}, {reserved / MIB:,.1f} MiB reserved")
    for device, trace in enumerate(snapshot["device_traces"]):
        if not trace:
            continue
        live, pending, oom = replay(trace)
        where = "at the first out-of-memory" if oom else "at the end of the trace (no out-of-memory)"
        print(f"\ndevice {device}: {len(trace)} events; {where}")
        if oom:
            print(f"  asked for {oom['size'] / MIB:,.1f} MiB; device free {oom.get('device_free', 0) / MIB:,.1f} MiB")
            print(f"  asked from: {site(oom.get('frames', []))}")
        for title, book in (("live", live), ("freed, waiting on a stream", pending)):
            sites = defaultdict(lambda: [0, 0])
            for size, where_from in book.values():
                sites[where_from][0] += size
                sites[where_from][1] += 1
            total = sum(s for s, _ in sites.values())
            print(f"  {title}: {total / MIB:,.1f} MiB in {len(book)} blocks")
            for name, (size, count) in sorted(sites.items(), key=lambda kv: -kv[1][0])[: args.top]:
                print(f"    {size / MIB:10,.1f} MiB {count:6} x  {name}")


if __name__ == "__main__":
    main()
