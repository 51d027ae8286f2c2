#!/usr/bin/env python3
"""CPU time per component between two snapshots, from /proc (no sampling).

    cpu_split.py snapshot FILE          # write the current counters to FILE
    cpu_split.py report FILE TASKS      # print CPU used since FILE, per task

Components are grouped by process name; everything else the machine did
(kernel threads, writeback, the bench client, which has exited by the
report, other processes) is reported as "other".
"""
import json
import os
import sys

GROUPS = {
    "beam.smp": "RabbitMQ",
    "postgres": "PostgreSQL",
    "s3s-fs": "S3 server",
    "distribuidor": "distribuidor",
    "worker": "worker",
}


def snapshot():
    per_group = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        group = GROUPS.get(comm, "other")
        per_group.setdefault(group, {})[pid] = ticks
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    busy = sum(cpu) - cpu[3] - cpu[4]  # minus idle and iowait
    return {"groups": per_group, "busy": busy, "total": sum(cpu)}


def report(before, after, tasks):
    hz = os.sysconf("SC_CLK_TCK")
    used = {}
    for group, pids in after["groups"].items():
        if group == "other":
            continue
        old = before["groups"].get(group, {})
        used[group] = sum(t - old.get(pid, 0) for pid, t in pids.items())
    busy = after["busy"] - before["busy"]
    elapsed = (after["total"] - before["total"]) / os.cpu_count()
    used["other (kernel, bench client, rest)"] = max(0, busy - sum(used.values()))
    rows = sorted(used.items(), key=lambda kv: -kv[1])
    print(f"CPU over {elapsed / hz:.1f} s, {busy / max(1, after['total'] - before['total']) * 100:.0f}% of {os.cpu_count()} cores busy, {tasks} tasks")
    for group, ticks in rows:
        print(f"  {group:<32} {ticks / hz:7.2f} s  {ticks / hz / tasks * 1e6:8.0f} us/task  {ticks / max(1, busy) * 100:5.1f}%")


if __name__ == "__main__":
    if sys.argv[1] == "snapshot":
        with open(sys.argv[2], "w") as f:
            json.dump(snapshot(), f)
    else:
        with open(sys.argv[2]) as f:
            report(json.load(f), snapshot(), int(sys.argv[3]))
