import time, fade, concurrent.futures as cf, cProfile, pstats, threading
from fade import clientio
from benchmarks.tasks import noop
profs = {}
orig = clientio.ClientIO._run
def run(self, *a, **k):
    pr = cProfile.Profile(); profs["io"] = pr
    pr.enable()
    try: return orig(self, *a, **k)
    finally: pr.disable()
clientio.ClientIO._run = run
with fade.Executor(max_workers=2) as ex:
    cf.wait([ex.submit(noop, i) for i in range(2000)])
    pr = cProfile.Profile(); pr.enable()
    for r in range(3):
        fs = [ex.submit(noop, i) for i in range(20000)]
        cf.wait(fs)
    pr.disable(); profs["main"] = pr
for name in ("main", "io"):
    print("=====", name)
    pstats.Stats(profs[name]).sort_stats("tottime").print_stats(28)
