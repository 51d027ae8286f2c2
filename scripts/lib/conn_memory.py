#!/usr/bin/env python3
"""Resident memory of a distribuidor holding many client connections.

Usage: scripts/lib/conn_memory.py BINARY CONNECTIONS PARTIAL_BYTES
  starts BINARY on 127.0.0.1:18890 (queue memconn), opens CONNECTIONS loopback
  connections that each send PARTIAL_BYTES of an unfinished message (0: none),
  and prints the RSS before and with them. Needs the services (scripts/services)."""
import socket, subprocess, sys, time, os, resource
h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; resource.setrlimit(resource.RLIMIT_NOFILE, (h, h))
binary, n, partial = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
env = dict(os.environ, DISTRIBUIDOR_ADDR="127.0.0.1:18890", TAREAS_QUEUE="memconn", RUST_LOG="warn")
p = subprocess.Popen(["bash", "-c", f"exec {binary}"], env=env)
time.sleep(2)
def rss():
    for line in open(f"/proc/{p.pid}/status"):
        if line.startswith("VmRSS"): return int(line.split()[1]) / 1024
base = rss()
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", 18890)); socks.append(s)
    if partial:
        s.sendall(b'{"type":"task","task_type":"echo","payload":{"text":"' + b"x" * partial)
time.sleep(3)
print(f"connections {n} partial {partial} B: RSS start {base:.1f} MiB, with them {rss():.1f} MiB, per connection {(rss()-base)*1024/n:.1f} KiB")
p.terminate(); p.wait()
