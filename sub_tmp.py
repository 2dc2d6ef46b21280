import time, fade, concurrent.futures as cf, psutil, os
from benchmarks.tasks import noop
with fade.Executor(max_workers=2) as ex:
    cf.wait([ex.submit(noop, i) for i in range(2000)])
    me = psutil.Process()
    kids = [psutil.Process(p) for p in ex._pool.pids]
    def cpu(): return [sum(me.cpu_times()[:2])] + [sum(k.cpu_times()[:2]) for k in kids]
    c0 = cpu(); t = time.perf_counter()
    for r in range(5):
        fs = [ex.submit(noop, i) for i in range(20000)]
        cf.wait(fs)
    el = time.perf_counter() - t; c1 = cpu()
    print(f"wall {el:.2f}s rate {100000/el:.0f}/s cpu client {c1[0]-c0[0]:.2f}s workers {[round(b-a,2) for a,b in zip(c0[1:],c1[1:])]}")
    th = {t.id: (t.user_time+t.system_time) for t in me.threads()}
    print(th)
