"""Probe (not part of the product): does a Gaussian / kNN on the breast recipe's U-Net features add to its map score?

Trains the shipped breast recipe (draem+ens2ctxiso, 128², 800 steps per member) on each BUSI split of
tools/bench_detectors.py, then scores every test image by
  * the model's own image score (``map``),
  * a Ledoit-Wolf Mahalanobis distance (``maha``) and a k-nearest-neighbour distance (``knn1/3/5``) on the scan-pooled
    bottleneck (mean and sd over the scan's cells) and 1/8-scale features (mean), averaged over the flip, the members
    concatenated (352 dims), fitted on the split's fit normals,
  * fusions ``map+w·maha`` / ``map+w·knn3`` (each term z-scored on the split's held-out validation normals).
Usage: python benchmarks/detectors_ab/global_features.py SEEDS [SIZE] [OUT.json] [MODEL_ROOT]
Result of 2026-12-04 (M8): benchmarks/detectors_ab/global_features_vm8.json; see benchmarks/detectors.md.
"""
import json, sys, time
from pathlib import Path
import numpy as np, torch
from sonomaly.tools import bench_detectors as bd
from sonomaly.engines.train import train, load_tensors, Source, make_input_card
from sonomaly.engines.models import build
from sonomaly.engines.models.common import split_input, mask_at
from sonomaly.engines.regions import clean_scan_region
from sonomaly.engines.metrics import auroc as _au
def auroc(n, a):
    return round(float(_au(np.r_[np.zeros(len(n)), np.ones(len(a))], np.r_[n, a])), 4)
from sklearn.covariance import LedoitWolf

root = Path(__file__).resolve().parents[3] / "shared/data/ultrasound"
over = bd.parse_overrides("real_p=0.5,aug=photo,score_erode=0,members=2,tta_flip=1,context=1,synth_iso=0.3,synth_surface=0.15")
bd.STEPS["draem"] = 800
size = int(sys.argv[2]) if len(sys.argv) > 2 else 128
seeds = [int(s) for s in sys.argv[1].split(",")]
out = {}

def feats(model, x):
    img, m = split_input(x)
    pm = mask_at(m, 16)
    res = []
    for i in range(model.members):
        net = model.member(i)
        for v, vm in ((img, pm), (img.flip(-1), pm.flip(-1))):
            a = net.e0(v); b = net.e1(a); c = net.e2(b); d = net.e3(c)
            if hasattr(net, "ctx"):
                d = d + net.ctx(d.mean((2, 3), keepdim=True))
            w = vm.sum((2, 3)).clamp(min=1)
            mu = (d * vm).sum((2, 3)) / w
            sd = (((d - mu[..., None, None]) ** 2) * vm).sum((2, 3)).div(w).sqrt()
            mc = mask_at(m if v is img else m.flip(-1), 8)
            wc = mc.sum((2, 3)).clamp(min=1)
            muc = (c * mc).sum((2, 3)) / wc
            res.append(torch.cat([mu, sd, muc], 1))
    # average the two views of each member, concatenate members
    r = [(res[2 * i] + res[2 * i + 1]) / 2 for i in range(model.members)]
    return torch.cat(r, 1)

for seed in seeds:
    t0 = time.time()
    sp = bd.splits(root, "busi", seed)
    cfg = {**bd.family_config("draem", "busi"), **over}
    data = sp["train"] + sp["train_abnormal"]
    epochs = bd._epochs_for("draem", len(sp["train"]), 16)
    od = Path(sys.argv[4] if len(sys.argv) > 4 else "/tmp/sonomaly-gfeat") / f"m{size}_s{seed}"
    if not (od / "model.pt").exists():
        train("draem", data, od, size=size, epochs=epochs, seed=seed, val_groups=sp["val_groups"], every=1,
              max_frames_per_file=None, family_config=cfg, progress=False, threads=2, max_seconds=600)
    card = json.loads((od / "card.json").read_text())
    model = build("draem", **{**cfg, "size": [size, size], "in_channels": 2, "seed": seed})
    model.load_state_dict(torch.load(od / "model.pt")); model.eval()
    icard = make_input_card(size, 2)
    test_n, test_a, _ = sp["test"]
    val = set(sp["val_groups"])
    groups = {"fit": [s.path for s in sp["train"] if s.group not in val], "val": [s.path for s in sp["train"] if s.group in val],
              "tn": test_n, "ta": test_a}
    F, S = {}, {}
    with torch.no_grad():
        for g, paths in groups.items():
            fs, ss = [], []
            for p in paths:
                x = torch.from_numpy(load_tensors(Source(Path(p), "x"), icard, every=1, max_frames=None, region_fn=clean_scan_region))
                fs.append(feats(model, x)[0].numpy()); ss.append(float(model(x)[1][0]))
            F[g], S[g] = np.array(fs), np.array(ss)
    res = {"map": auroc(S["tn"], S["ta"])}
    D = F["fit"].shape[1]
    mu = F["fit"].mean(0); sdv = F["fit"].std(0) + 1e-6
    Z = {g: (F[g] - mu) / sdv for g in F}
    lw = LedoitWolf().fit(Z["fit"])
    P = lw.precision_
    maha = {g: np.einsum("ij,jk,ik->i", Z[g], P, Z[g]) for g in Z}
    res["maha"] = auroc(maha["tn"], maha["ta"])
    for k in (1, 3, 5):
        dd = {g: np.sort(((Z[g][:, None] - Z["fit"][None]) ** 2).sum(-1), 1)[:, :k].mean(1) for g in ("val", "tn", "ta")}
        res[f"knn{k}"] = auroc(dd["tn"], dd["ta"])
        if k == 3: knn = dd
    def z(d, g): return (d[g] - d["val"].mean()) / (d["val"].std() + 1e-9)
    for nm, d in (("maha", maha), ("knn3", knn)):
        for wgt in (0.5, 1.0):
            fused = {g: z(S, g) + wgt * z(d, g) for g in ("tn", "ta")}
            res[f"map+{wgt}{nm}"] = auroc(fused["tn"], fused["ta"])
    res["n"] = (len(F["fit"]), len(F["val"]), len(F["tn"]), len(F["ta"]), D)
    res["s"] = round(time.time() - t0)
    out[seed] = res
    print(seed, json.dumps(res), flush=True)
Path(sys.argv[3] if len(sys.argv) > 3 else f"gfeat_{size}.json").write_text(json.dumps(out, indent=1))
