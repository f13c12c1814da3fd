"""Run the test suite and refuse to pass when no test ran.

pytest exits with 5 when it collects nothing; a green run that tested nothing must not pass.
"""

import sys

import pytest


def main() -> int:
    code = pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]])
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("error: pytest collected no tests", file=sys.stderr)
        return 1
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
