"""Random small architectures through ``qcompile.compile`` (and ``qcompile.qat``): does every compile either PASS
validation or stop with a one-line UserError?

The models come from ``random_models.py`` (five families: CNNs, sequence models, dense prediction / several inputs
/ 3-D / 1-D, an "op soup" of less common tensor ops, FPN detectors), random weights with BatchNorm statistics from
their own inputs. Each is compiled, on 32 calibration and 16 held-out inputs, with a share of: fp32, uniform W8A8,
APoT W4A4, APoT-4 weights with 8-bit uniform activations, PoT W4A4, uniform W4A4 in the custom form, APoT W3A3 in
the shift-add form. ``--qat`` also runs ``qat.prepare`` -> 5 Adam steps -> ``qat.export`` on the CNN and sequence
families (APoT, PACT, STE, SDQ, PoT methods by turn).

Every run is one of PASS, FAIL (validation failed: a file that does not compute its simulation, or a tolerance
problem), USERERROR (refused in one line: an option that cannot apply) or CRASH (any other exception: a qcompile
bug). This sweep found a nearest resize to a skip's size exported one pixel column off (``qcompile/export.py``),
PoT-6 drift misread as wrong codes (``runtime/validation.py``) and QAT stopping on one-weight channels.

Run: ``python benchmarks/bench_random_models.py [--seeds 12] [--qat]`` (about 5 minutes at 12 seeds on 2 cores).
Writes ``benchmarks/results/random_models.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import random_models  # noqa: E402

import qcompile  # noqa: E402
from qcompile.errors import UserError  # noqa: E402

CONFIGS = [dict(scheme="fp32"), dict(scheme="uniform", bits=8), dict(scheme="apot", bits=4),
           dict(scheme="apot", bits=4, wscheme="apot", wbits=4, ascheme="uniform", abits=8),
           dict(scheme="pot", bits=4), dict(scheme="uniform", bits=4, emit="custom"),
           dict(scheme="apot", bits=3, emit="shift-add")]
QAT_METHODS = [dict(scheme="apot", bits=4, method="apot"), dict(scheme="uniform", bits=4, method="pact"),
               dict(scheme="uniform", bits=8, method="ste"), dict(scheme="log2", bits=4, method="sdq"),
               dict(scheme="pot", bits=3, method="apot")]


def _outcome(run) -> dict:
    t0 = time.perf_counter()
    try:
        report = run().report
        row = {"status": "PASS" if report.passed else "FAIL", "codes_differ": report.extra.get("codes_differ"),
               "codes_differ_local": report.extra.get("codes_differ_local"),
               "sqnr_vs_float_db": common.json_float(report.extra.get("sqnr_vs_float_db"))}
        if not report.passed:
            row["failures"] = report.failures[:3]
    except UserError as e:
        row = {"status": "USERERROR", "message": str(e)[:300]}
    except Exception as e:  # noqa: BLE001 -- a crash is what the sweep looks for
        row = {"status": "CRASH", "message": f"{type(e).__name__}: {str(e)[:300]}",
               "where": traceback.format_exc().splitlines()[-3:]}
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=12, help="models per family")
    ap.add_argument("--families", default=",".join(random_models.FAMILIES))
    ap.add_argument("--qat", action="store_true", help="also QAT runs on the cnn and sequence families")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "random_models.json"))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    t_start = time.perf_counter()
    runs = []
    for family in args.families.split(","):
        for seed in range(args.seeds):
            model, inputs = random_models.make(family, seed)
            calib = tuple(t[:32] for t in inputs)
            valid = tuple(t[32:] for t in inputs)
            one = len(inputs) == 1
            for i, options in enumerate(CONFIGS):
                if i > 2 and (seed + i) % 2:  # every model: fp32, W8A8, APoT W4A4; half of the others
                    continue
                row = _outcome(lambda: qcompile.compile(
                    model, tuple(t[:1] for t in inputs), calib=calib[0] if one else calib,
                    validation_inputs=valid[0] if one else valid, progress=False, **options))
                row.update(family=family, seed=seed, model=type(model).__name__, options=options)
                runs.append(row)
                print(f"{family} {seed} {options}: {row['status']} {row.get('message', row.get('failures', ''))}",
                      flush=True)
            if args.qat and family in ("cnn", "sequence") and one:
                method = QAT_METHODS[seed % len(QAT_METHODS)]

                def qat_run():
                    from qcompile import qat

                    gm = qat.prepare(model, inputs[0][:1], calib=calib[0], **method)
                    opt = torch.optim.Adam(qat.param_groups(gm, lr_alpha=1e-2), lr=1e-3)
                    target = torch.arange(32) % 5
                    for _ in range(5):
                        loss = F.cross_entropy(gm(calib[0])[:, :5], target)
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                    return qat.export(gm, inputs[0][:1], validation_inputs=valid[0])

                row = _outcome(qat_run)
                row.update(family=family, seed=seed, model=type(model).__name__, options={"qat": method})
                runs.append(row)
                print(f"{family} {seed} qat {method}: {row['status']} {row.get('message', row.get('failures', ''))}",
                      flush=True)
    counts = {}
    for row in runs:
        counts.setdefault(row["family"], {}).setdefault(row["status"], 0)
        counts[row["family"]][row["status"]] += 1
    statuses = ("PASS", "FAIL", "USERERROR", "CRASH")
    table = [[family] + [c.get(s, 0) for s in statuses] for family, c in counts.items()]
    total = {s: sum(c.get(s, 0) for c in counts.values()) for s in statuses}
    results = {"benchmark": "random_models", "environment": common.environment(), "seeds_per_family": args.seeds,
               "qat": args.qat, "summary": {"runs": len(runs), **total}, "by_family": counts,
               "not_passed": [r for r in runs if r["status"] != "PASS"], "runs": runs}
    common.finish(results, args.out, ["family"] + list(statuses), table, t_start)
    return 0 if total["FAIL"] == 0 and total["CRASH"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
