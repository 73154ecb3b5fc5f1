"""``twistd`` under cProfile: ``python -m bench.profiled_twistd OUT.pstats TWISTD-ARGS...``.

twistd ends a SIGTERM shutdown by re-raising the signal, so ``python -m
cProfile`` never gets to write its file; the stats are dumped from a
shutdown trigger instead.
"""

import cProfile
import sys


def main():
    out, args = sys.argv[1], sys.argv[2:]
    from twisted.internet import reactor
    from twisted.scripts.twistd import run

    profile = cProfile.Profile()

    def dump():
        profile.disable()
        profile.dump_stats(out)

    reactor.addSystemEventTrigger("after", "shutdown", dump)
    sys.argv = ["twistd"] + args
    profile.enable()
    run()


if __name__ == "__main__":
    main()
