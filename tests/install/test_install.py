#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""cmake --install of this build tree with DESTDIR into a temporary directory,
then the installed tree is checked:
  - the three programs, executable, and they run (--version);
  - the man pages vqcowd.8, vqcowctl.8, vqcow-img.1 in <mandir>/man8|man1; each
    renders with man -l (NAME section present), groff -ww -z -man prints no
    warning, and mandoc -T lint finds nothing but scdoc's harmless empty
    paragraph macros (mandoc optional: a visible note when it is missing);
  - the systemd units and sysusers entry, with ExecStart naming the installed
    vqcowd and Documentation the installed README; systemd-analyze verify on
    copies pointing into DESTDIR (a visible SKIP of that part without it);
  - the vhost-user backend descriptor in <datadir>/qemu/vhost-user/: valid JSON
    with the required members of QEMU's VhostUserBackend (description, type,
    binary; tags optional, nothing else), type "block", binary the installed
    vqcowd, whose --print-capabilities reports type "block" and only features
    QEMU's VHostUserBackendBlockFeature knows;
  - the README in <docdir>, identical to the source's.
Exit 77 if cmake is missing; 1 on any failure."""

import argparse
import filecmp
import json
import re
import os
import shutil
import subprocess
import sys
import tempfile

FAILS = []


def fail(msg):
    FAILS.append(msg)
    print("FAIL: " + msg, flush=True)


def ok(msg):
    print("ok: " + msg, flush=True)


def run(argv, **kw):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120, **kw)


def check_man(path, name):
    env = dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="0", LC_ALL="C.UTF-8")
    if shutil.which("man"):
        r = run(["man", "-l", path], env=env)
        text = re.sub(".\x08", "", r.stdout.decode(errors="replace"))  # overstrike (bold)
        if r.returncode != 0 or "NAME" not in text or name not in text:
            fail("man -l %s: rc %d, output %r, %s" % (path, r.returncode, text[:200],
                                                       r.stderr.decode()))
        elif r.stderr.strip():
            fail("man -l %s warned: %s" % (path, r.stderr.decode()))
        else:
            ok("man -l %s renders (%d lines)" % (os.path.basename(path), text.count("\n")))
    else:
        print("note: man not found: man -l not run")
    if shutil.which("groff"):
        r = run(["groff", "-ww", "-z", "-man", path])
        if r.returncode != 0 or r.stderr.strip():
            fail("groff -ww %s: %s" % (path, r.stderr.decode()))
        else:
            ok("groff -ww %s: no warnings" % os.path.basename(path))
    else:
        fail("groff not found (man-db needs it): the man pages cannot be checked")
    if shutil.which("mandoc"):
        r = run(["mandoc", "-T", "lint", "-W", "warning", path])
        bad = [ln for ln in (r.stdout + r.stderr).decode().splitlines()
               if ln.strip() and "skipping paragraph macro" not in ln]
        if bad:
            fail("mandoc -T lint %s:\n%s" % (path, "\n".join(bad)))
        else:
            ok("mandoc -T lint %s: clean" % os.path.basename(path))
    else:
        print("note: mandoc not found: mandoc -T lint not run (groff checked the page)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--man", default="1")
    a = ap.parse_args()
    if not shutil.which("cmake"):
        print("SKIP: cmake not found")
        return 77
    prefix = a.prefix.rstrip("/") or "/"
    dest = tempfile.mkdtemp(prefix="vqcow-install-")
    try:
        r = run(["cmake", "--install", a.build], env=dict(os.environ, DESTDIR=dest))
        if r.returncode != 0:
            fail("cmake --install: rc %d\n%s%s" % (r.returncode, r.stdout.decode(),
                                                   r.stderr.decode()))
            return 1
        root = dest + prefix

        def p(*parts):
            return os.path.join(root, *parts)

        # programs
        for b in ("vqcowd", "vqcow-img", "vqcowctl"):
            exe = p("bin", b)
            if not os.access(exe, os.X_OK):
                fail("%s not installed (or not executable)" % exe)
                continue
            r = run([exe, "--version"])
            if r.returncode != 0 or b"0." not in r.stdout:
                fail("%s --version: rc %d %r" % (exe, r.returncode, r.stdout))
            else:
                ok("bin/%s runs: %s" % (b, r.stdout.decode().strip()))
        # man pages
        if a.man in ("1", "ON", "TRUE", "YES", "on", "true"):
            for page in ("vqcowd.8", "vqcowctl.8", "vqcow-img.1"):
                path = p("share", "man", "man" + page[-1], page)
                if not os.path.isfile(path):
                    fail("man page %s not installed" % path)
                    continue
                check_man(path, page.rsplit(".", 1)[0])
        else:
            fail("built with -DVQCOW_MAN=OFF: no man pages to check")
        # systemd
        unitdir = p("lib", "systemd", "system")
        svc = os.path.join(unitdir, "vqcowd@.service")
        sock = os.path.join(unitdir, "vqcowd@.socket")
        sysusers = p("lib", "sysusers.d", "vqcow.conf")
        for f in (svc, sock, sysusers):
            if not os.path.isfile(f):
                fail("%s not installed" % f)
        if os.path.isfile(svc) and os.path.isfile(sock):
            text = open(svc).read()
            execs = [ln for ln in text.splitlines() if ln.startswith("ExecStart=")]
            binpath = os.path.join(prefix, "bin", "vqcowd")
            if len(execs) != 1 or execs[0].split("=", 1)[1].split()[0] != binpath:
                fail("ExecStart does not name the installed %s: %s" % (binpath, execs))
            else:
                ok("ExecStart=%s ..." % binpath)
            readme = os.path.join(prefix, "share", "doc", "vqcow", "README.md")
            for f in (svc, sock):
                t = open(f).read()
                if "@" + "bindir@" in t or "@" + "docdir@" in t:
                    fail("%s: unsubstituted @...@ left" % f)
                if "file://" + readme not in t:
                    fail("%s: Documentation= does not name the installed %s" % (f, readme))
            if shutil.which("systemd-analyze"):
                ud = tempfile.mkdtemp(prefix="units-", dir=dest)
                with open(os.path.join(ud, "vqcowd@vm1.service"), "w") as f:
                    f.write(text.replace("ExecStart=" + binpath, "ExecStart=" + root + "/bin/vqcowd"))
                shutil.copy(sock, os.path.join(ud, "vqcowd@vm1.socket"))
                # Documentation=man:vqcowd(8) is looked up with man: in DESTDIR
                env = dict(os.environ, MANPATH=p("share", "man"))
                r = run(["systemd-analyze", "verify", "./vqcowd@vm1.service",
                         "./vqcowd@vm1.socket"], cwd=ud, env=env)
                out = (r.stdout + r.stderr).decode()
                # the unit's user exists only once systemd-sysusers ran on a real install
                bad = [ln for ln in out.splitlines() if ln.strip() and "vqcow" in ln
                       and "User=" not in ln and "user" not in ln.lower()]
                if r.returncode != 0 and bad:
                    fail("systemd-analyze verify: rc %d\n%s" % (r.returncode, out))
                else:
                    ok("systemd-analyze verify: the units verify%s"
                       % ("" if not out.strip() else " (notes: %s)" % out.strip().replace("\n", "; ")))
            else:
                print("SKIP (part): systemd-analyze not found: the units were not verified")
        # vhost-user descriptor
        desc = p("share", "qemu", "vhost-user", "50-vqcowd.json")
        if not os.path.isfile(desc):
            fail("%s not installed" % desc)
        else:
            try:
                js = json.load(open(desc))
            except ValueError as e:
                js = None
                fail("%s: invalid JSON: %s" % (desc, e))
            if js is not None:
                required = {"description", "type", "binary"}
                allowed = required | {"tags"}
                if not isinstance(js, dict) or not required <= set(js) or set(js) - allowed:
                    fail("%s: members %s, VhostUserBackend wants %s (+ tags)"
                         % (desc, sorted(js) if isinstance(js, dict) else js, sorted(required)))
                elif js["type"] != "block" or not isinstance(js["description"], str) \
                        or not all(isinstance(t, str) for t in js.get("tags", [])):
                    fail("%s: type %r (want block) or non-string members" % (desc, js["type"]))
                elif js["binary"] != os.path.join(prefix, "bin", "vqcowd"):
                    fail("%s: binary %r is not the installed vqcowd" % (desc, js["binary"]))
                else:
                    r = run([root + "/bin/vqcowd", "--print-capabilities"])
                    try:
                        caps = json.loads(r.stdout)
                    except ValueError:
                        caps = {}
                    feats = set(caps.get("features", []))
                    if caps.get("type") != "block" or not feats <= {"read-only", "blk-file"} \
                            or "blk-file" not in feats:
                        fail("vqcowd --print-capabilities does not match the descriptor: %s"
                             % r.stdout.decode())
                    else:
                        ok("50-vqcowd.json: VhostUserBackend, type block, binary %s; "
                           "capabilities %s" % (js["binary"], sorted(feats)))
        # README
        readme = p("share", "doc", "vqcow", "README.md")
        if not os.path.isfile(readme) or not filecmp.cmp(readme, os.path.join(a.source, "README.md"),
                                                          shallow=False):
            fail("%s missing or not the source's README.md" % readme)
        else:
            ok("share/doc/vqcow/README.md")
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    if FAILS:
        print("%d failure(s)" % len(FAILS))
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
