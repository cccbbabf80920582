import sys


def main(argv=None):
    print("landscape: no commands yet", file=sys.stderr)
    return 2
