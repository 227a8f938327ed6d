#!/usr/bin/env python3
"""Runs one Eclipse Paho interoperability suite (client_test.py or client_test5.py from
paho.mqtt.testing/interoperability) and writes one "pass|FAIL|ERROR|skip NAME" line per test.

Usage (from the interoperability directory): paho_suite.py SUITE PORT RESULTS [Test.name ...]

Why a wrapper: both suites hand their own command line to unittest, which rejects -p; and
`-h HOST` matches their `o in ("--help")` (a string, not a tuple), so they stop at the usage
text. They therefore run against "localhost" (IPv4: their client opens AF_INET sockets) with
the port given here, and unittest gets only the test names.
"""
import runpy
import sys
import unittest

suite, port, results_path = sys.argv[1], sys.argv[2], sys.argv[3]
selected = sys.argv[4:]
outcomes = []


class Recording(unittest.TextTestResult):
    def addSuccess(self, test):
        super().addSuccess(test)
        outcomes.append(("pass", test))

    def addFailure(self, test, err):
        super().addFailure(test, err)
        outcomes.append(("FAIL", test))

    def addError(self, test, err):
        super().addError(test, err)
        outcomes.append(("ERROR", test))

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        outcomes.append(("skip", test))


real_main = unittest.main


def main(*args, **kwargs):
    kwargs["argv"] = [suite] + selected
    kwargs["exit"] = False
    kwargs["testRunner"] = unittest.TextTestRunner(resultclass=Recording, verbosity=2)
    return real_main(*args, **kwargs)


unittest.main = main
sys.argv = [suite, "-p", port]
sys.path.insert(0, ".")
try:
    runpy.run_path(suite, run_name="__main__")
finally:
    with open(results_path, "w") as f:
        for outcome, test in outcomes:
            name = getattr(test, "_testMethodName", None) or str(test)
            f.write(f"{outcome} {name}\n")
sys.exit(0 if outcomes and all(o in ("pass", "skip") for o, _ in outcomes) else 1)
