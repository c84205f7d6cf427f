"""Writes the licence files of what the llama-orch binaries are made of, into DIR:

  copyright      Debian's machine-readable copyright file: llama-orch (Apache-2.0, the
                 text in /usr/share/common-licenses), llama.cpp and ggml as built into
                 llorch-engine (MIT, their notice in full);
  THIRD-PARTY    every Rust crate the binaries link, with its version and licence, from
                 `cargo metadata` (normal dependencies of the binary crates only).

Usage: python3 scripts/licences.py REPO_ROOT DIR
"""
import json
import os
import subprocess
import sys

root, out = sys.argv[1:3]
BINARY_CRATES = {"orchestratord", "pool-managerd", "llorch-engine", "engine-provisioner", "llorch"}

meta = json.loads(subprocess.run(
    ["cargo", "metadata", "--format-version", "1", "--locked", "--offline",
     "--manifest-path", os.path.join(root, "Cargo.toml")],
    check=True, capture_output=True, text=True).stdout)
packages = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
workspace = set(meta["workspace_members"])

# The crates the binaries link: normal (not dev, not build) dependencies, transitively.
todo = [i for i in workspace if packages[i]["name"] in BINARY_CRATES]
seen = set()
while todo:
    i = todo.pop()
    if i in seen:
        continue
    seen.add(i)
    for dep in nodes[i]["deps"]:
        if any(k["kind"] is None for k in dep["dep_kinds"]):
            todo.append(dep["pkg"])

third = sorted((packages[i] for i in seen if i not in workspace),
               key=lambda p: (p["name"], p["version"]))
missing = [p["name"] for p in third if not (p.get("license") or p.get("license_file"))]
if missing:
    sys.exit(f"licences: no licence declared by {', '.join(missing)}")
with open(os.path.join(out, "THIRD-PARTY"), "w") as f:
    f.write("Rust crates linked into the llama-orch binaries (name, version, licence).\n")
    f.write("Their licence texts are in each crate's source at crates.io.\n\n")
    for p in third:
        f.write(f"{p['name']} {p['version']}: {p.get('license') or 'see ' + p['license_file']}\n")

sys_crate = next(p for p in third if p["name"] == "llama-cpp-sys-2")
llama = os.path.join(os.path.dirname(sys_crate["manifest_path"]), "llama.cpp", "LICENSE")
with open(llama) as f:
    mit = f.read().strip()
notice = "\n".join(" " + (line if line.strip() else ".") for line in mit.splitlines())

with open(os.path.join(out, "copyright"), "w") as f:
    f.write(f"""Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: llama-orch
Comment: The Rust crates linked into the binaries, with their licences, are listed in
 /usr/share/doc/llama-orch/THIRD-PARTY.

Files: *
Copyright: llama-orch developers
License: Apache-2.0

Files: usr/bin/llorch-engine
Copyright: llama-orch developers
 The ggml authors (llama.cpp and ggml, built in by llama-cpp-sys-2 {sys_crate['version']})
License: Apache-2.0 and MIT

License: Apache-2.0
 Licensed under the Apache License, Version 2.0 (the "License"); you may not use
 this file except in compliance with the License.
 .
 On Debian systems, the complete text of the Apache License, Version 2.0 can be
 found in /usr/share/common-licenses/Apache-2.0.

License: MIT
{notice}
""")
print(f"licences: {len(third)} crates", file=sys.stderr)
