#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The man pages cannot drift from the programs: every option (long and short)
and every command that a program's --help prints must appear in its man page
source (man/NAME.SECTION.scd) as a bold *--option* / *-x* / *command* (or
*command subcommand*).
A failure names the page to edit."""

import argparse
import re
import subprocess
import sys

PAGES = {"vqcowd": "vqcowd.8", "vqcowctl": "vqcowctl.8", "vqcow-img": "vqcow-img.1"}


def help_text(binary):
    p = subprocess.run([binary, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=30)
    if p.returncode != 0:
        sys.exit("FAIL: %s --help exited %d" % (binary, p.returncode))
    return p.stdout.decode()


def commands(name, text):
    """Sub-commands listed by --help (vqcow-img: "  create [...", vqcowctl:
    the "Commands:" section)."""
    out = set()
    if name == "vqcow-img":
        for m in re.finditer(r"^  ([a-z][a-z-]*)(?: |$)", text, re.M):
            out.add(m.group(1))
    elif name == "vqcowctl":
        sect = text.split("Commands:", 1)[1].split("Options:", 1)[0]
        for m in re.finditer(r"^  ([a-z][a-z-]*)\b", sect, re.M):
            out.add(m.group(1))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", required=True)
    for n in PAGES:
        ap.add_argument("--" + n, required=True)
    a = ap.parse_args()
    missing = []
    total = 0
    for name, page in PAGES.items():
        text = help_text(getattr(a, name.replace("-", "_")))
        src = "%s/man/%s.scd" % (a.source, page)
        with open(src) as f:
            man = f.read()
        longs = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", text))
        shorts = set(re.findall(r"(?<![\w-])(-[A-Za-z])(?![\w-])", text))
        cmds = commands(name, text)
        for opt in sorted(longs | shorts):
            total += 1
            if not re.search(r"\*%s\*" % re.escape(opt), man):
                missing.append("%s --help lists %s, %s does not document it (*%s*)"
                               % (name, opt, src, opt))
        for c in sorted(cmds):
            total += 1
            # bold, alone or as the first word of a bold span (*snapshot create*)
            if not re.search(r"\*%s[* ]" % re.escape(c), man):
                missing.append("%s --help lists the command %s, %s does not document it"
                               % (name, c, src))
        print("%s: %d long options, %d short options, %d commands in --help"
              % (name, len(longs), len(shorts), len(cmds)))
    if missing:
        for m in missing:
            print("FAIL: " + m)
        print("edit the man page sources in man/ (scdoc) so they document what --help shows")
        return 1
    print("PASS: all %d options and commands of the three --help outputs are documented" % total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
