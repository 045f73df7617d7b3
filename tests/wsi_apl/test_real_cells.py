"""Real single-cell pictures: class-folder sets, class maps, unreadable pictures, the paper's layout,
stain normalisation and the red-cell pixel size."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import testdata
from workers.bundle import load_bundle
from workers.classifier import HEADS
from wsi_apl.cli import main
from wsi_apl.train.picture_sets import FolderSource, read_folder_sets

MATEK_MPP = 0.097
PBC_MPP = 0.107


def _copy(src_dir, names, dst_dir):
    dst_dir.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(src_dir / n, dst_dir / n)


@pytest.fixture(scope="module")
def folder_sets(tmp_path_factory):
    """A few shared real pictures in both published layouts, one truncated JPEG and one junk file."""
    matek = testdata("real-cells", "matek-bone-marrow")
    pbc = testdata("real-cells", "pbc-peripheral-blood")
    root = tmp_path_factory.mktemp("real")
    m = root / "marrow"
    for cls, n in (("BLA", 8), ("PMO", 8), ("LYT", 3), ("NGS", 3)):
        _copy(matek / cls, sorted(p.name for p in (matek / cls).glob("*.jpg"))[:n], m / cls)
    good = (m / "BLA" / sorted(p.name for p in (m / "BLA").iterdir())[0]).read_bytes()
    (m / "BLA" / "BLA_99999.jpg").write_bytes(good[: len(good) // 3])  # truncated
    (m / "NGS" / "notes.jpg").write_text("not a picture")
    b = root / "blood"
    ig = sorted(p.name for p in (pbc / "ig").glob("*.jpg"))
    pick = [n for n in ig if n.startswith("PMY_")][:4] + [n for n in ig if n.startswith("MY_")][:2] + \
        [n for n in ig if n.startswith("IG_")][:2]
    _copy(pbc / "ig", pick, b / "ig")
    _copy(pbc / "lymphocyte", sorted(p.name for p in (pbc / "lymphocyte").glob("*.jpg"))[:2], b / "lymphocyte")
    return root


def test_folder_sets_labels_padding_and_unreadable(folder_sets):
    sources = [FolderSource(folder_sets / "marrow", MATEK_MPP), FolderSource(folder_sets / "blood", PBC_MPP)]
    cells, report = read_folder_sets(sources, HEADS, 0.25, 32.0, log=lambda s: None)
    jb, jp, ja = HEADS.index("myeloblast"), HEADS.index("promyelocyte"), HEADS.index("auer_rod")
    names = list(cells.patients)
    assert len(cells) == 22 + 10  # the truncated JPEG and the text file are skipped
    assert len(report.unreadable) == 2 and any("BLA_99999" in p for p, _ in report.unreadable)
    assert any("unreadable" in line for line in report.lines())
    lab = {n.split("/", 1)[-1]: cells.labels[i] for i, n in enumerate(names)}
    bla = [v for k, v in lab.items() if k.startswith("BLA/")]
    assert len(bla) == 8 and all(v[jb] == 1 and v[jp] == 0 for v in bla)
    assert all(v[jp] == 1 and v[jb] == 0 for k, v in lab.items() if k.startswith("PMO/") or "/PMY_" in k)
    assert all(v[jp] == 0 and v[jb] == 0 for k, v in lab.items() if "/MY_" in k or k.startswith(("LYT/", "NGS/")))
    ig = [v for k, v in lab.items() if "/IG_" in k]  # unspecified immature granulocytes: maybe promyelocytes
    assert len(ig) == 2 and all(np.isnan(v[jp]) and v[jb] == 0 for v in ig)
    assert np.isnan(cells.labels[:, ja]).all()  # no folder says anything of Auer rods
    # a 250-px marrow picture at 0.097 µm/px is 24 µm: padded to the 40-µm window, never stretched
    assert report.padded == 22
    assert all(im.shape == (160, 160, 3) for im in cells.images)
    crop = cells.crops(__import__("workers.classifier", fromlist=["CellConfig"]).CellConfig())[0]
    assert crop.shape == (128, 128, 3)
    # the marrow picture fills the central 24/32 of the crop; the border is its glass colour, flat
    border = crop[:, :8].reshape(-1, 3).astype(float)
    assert border.std(axis=0).max() < 2.0


def test_class_map_for_other_names(tmp_path, folder_sets):
    src = folder_sets / "marrow"
    d = tmp_path / "set"
    for cls, name in (("BLA", "blasten"), ("LYT", "lymphos"), ("PMO", "unklar")):
        (d / name).mkdir(parents=True)
        for k, f in enumerate(sorted((src / cls).glob("*_0*.jpg"))):
            shutil.copy(f, d / name / f"img{k:03d}.jpg")  # names that say nothing of the class
    cmap = tmp_path / "map.csv"
    cmap.write_text("class,myeloblast,promyelocyte\nblasten,1,0\nlymphos,0,0\nunklar,,\n")
    cells, report = read_folder_sets([FolderSource(d, MATEK_MPP, cmap)], HEADS, 0.25, 32.0, log=lambda s: None)
    jb, jp = HEADS.index("myeloblast"), HEADS.index("promyelocyte")
    assert cells.labels[:, jb].tolist().count(1.0) == 8
    unk = [i for i, n in enumerate(cells.patients) if "/unklar/" in n]
    assert len(unk) == 8 and np.isnan(cells.labels[unk][:, [jb, jp]]).all()
    # without the map, none of these names is known
    with pytest.raises(ValueError, match="class-map"):
        read_folder_sets([FolderSource(d, MATEK_MPP)], HEADS, 0.25, 32.0, log=lambda s: None)


def test_train_and_evaluate_on_folder_sets(folder_sets, tmp_path):
    """The real path: train cells from two folder sets at their own pixel sizes, stain-normalised, then
    evaluate on a folder set; the JSON keeps its keys and says the split was by picture."""
    out = tmp_path / "bundle"
    r = CliRunner().invoke(main, ["train", "cells", "--folders", f"{folder_sets / 'marrow'}:{MATEK_MPP}",
                                  "--folders", f"{folder_sets / 'blood'}:{PBC_MPP}", "--heads",
                                  "myeloblast,promyelocyte", "--out", str(out), "--epochs", "1",
                                  "--stain-aug", "hed", "--stain-norm", "reinhard"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "unreadable" in r.output and "split is by picture" in r.output and "cells/s" in r.output
    part = load_bundle(out).part("cells")
    assert part["config"]["stain_norm"] == "reinhard" and len(part["config"]["stain_target"]["means"]) == 3
    assert part["metrics"]["stain_aug"] == "hed" and part["metrics"]["notes"]
    r = CliRunner().invoke(main, ["evaluate", "cells", "--bundle", str(out), "--folders", str(folder_sets / "marrow"),
                                  "--image-mpp", str(MATEK_MPP), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert set(m["heads"]) == {"myeloblast", "promyelocyte"}
    for h in m["heads"].values():
        assert {"auroc", "auroc_ci", "auprc", "auprc_ci", "n", "positives"} <= set(h)
    assert m["heads"]["myeloblast"]["n"] == 22 and m["heads"]["myeloblast"]["positives"] == 8
    pair = m["promyelocyte_vs_myeloblast"]
    assert pair["promyelocytes"] == 8 and pair["myeloblasts"] == 8 and "auroc_ci" in pair["heads"]["promyelocyte"]
    assert len(m["read"]["unreadable"]) == 2 and m["notes"]


def test_synthetic_cohort_and_real_cells_in_one_run(folder_sets, tmp_path):
    """A lab's own real cells next to a synthetic cohort (--truth): the cohort's slides (0.25 µm/px) are
    resampled to the heads' 0.1875 µm/px and joined with the pictures; the validation is per source."""
    from wsi_apl.synth.cohort import synth_cohort

    cohort = tmp_path / "cohort"
    synth_cohort(cohort, ["apl"] * 3 + ["healthy"] * 3, seed=71, mpp=0.25, size=(1024, 768), plain=True)
    out = tmp_path / "bundle"
    r = CliRunner().invoke(main, ["train", "cells", "--truth", str(cohort), "--folders",
                                  f"{folder_sets / 'marrow'}:{MATEK_MPP}", "--heads", "myeloblast,promyelocyte",
                                  "--out", str(out), "--epochs", "1"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    per_source = load_bundle(out).part("cells")["metrics"].get("validation_by_source") or {}
    assert len(per_source) == 2, r.output


def test_folders_need_a_pixel_size(folder_sets, tmp_path):
    r = CliRunner().invoke(main, ["train", "cells", "--folders", str(folder_sets / "marrow"), "--out",
                                  str(tmp_path / "b")])
    assert r.exit_code != 0 and "estimate-mpp" in r.output


def test_a_truncated_picture_does_not_stop_csv_training(tmp_path):
    """One bad picture among the cells CSV's is skipped with its cells, and said so."""
    from PIL import Image

    from wsi_apl.train.cell_labels import read_cells_csv

    rng = np.random.default_rng(0)
    rows = []
    for k in range(3):
        img = (rng.random((96, 96, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / f"p{k}.jpg")
        rows += [{"image": f"p{k}.jpg", "x0": 10, "y0": 10, "x1": 40, "y1": 40, "myeloblast": k % 2}]
    data = (tmp_path / "p1.jpg").read_bytes()
    (tmp_path / "p1.jpg").write_bytes(data[: len(data) // 4])
    with (tmp_path / "cells.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    said = []
    cells = read_cells_csv(tmp_path / "cells.csv", None, HEADS, 0.5, 0.5, log=said.append)
    assert len(cells) == 2 and len(cells.images) == 2
    assert any("skipped 1 unreadable" in s for s in said) and any("p1.jpg" in s for s in said)


def test_red_cells_give_the_pixel_size(tmp_path):
    """Discs of a known diameter, cut by the border too, give the pixel size; real blood pictures a
    plausible one."""
    from PIL import Image

    from tile_selector.red_cells import estimate_mpp

    rng = np.random.default_rng(1)
    pics = []
    for _ in range(6):
        img = np.full((300, 300, 3), (235, 228, 222), np.uint8)
        yy, xx = np.mgrid[:300, :300]
        for _ in range(7):
            cx, cy = rng.uniform(-20, 320, 2)
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= 30.0 ** 2  # 60 px across
            img[disc] = (205, 150, 160)
        img[(xx - 150) ** 2 + (yy - 150) ** 2 <= 35.0 ** 2] = (90, 50, 140)  # a nucleated cell
        pics.append(np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8))
    est = estimate_mpp(pics, red_cell_um=7.5)
    assert est.mode_px == pytest.approx(60.0, rel=0.05) and est.mpp == pytest.approx(0.125, rel=0.05)
    pbc = testdata("real-cells", "pbc-peripheral-blood", "lymphocyte")
    real = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(pbc.glob("*.jpg"))[:40]]
    assert 0.09 < estimate_mpp(real).mpp < 0.125


def test_stain_normalisation_maps_colours_and_travels_with_the_heads():
    from workers.classifier import CellClassifier, CellConfig, classify
    from workers.stain import fit_stain_target, normalise_crops

    rng = np.random.default_rng(2)
    ref = np.clip(rng.normal((200, 150, 190), 25, (16, 32, 32, 3)), 0, 255).astype(np.uint8)
    other = np.clip(rng.normal((150, 170, 230), 25, (4, 32, 32, 3)), 0, 255).astype(np.uint8)
    target = fit_stain_target(ref, "reinhard")
    out = normalise_crops(other, "reinhard", target)
    assert np.abs(out.reshape(-1, 3).mean(0) - ref.reshape(-1, 3).mean(0)).max() < 12
    assert np.abs(other.reshape(-1, 3).mean(0) - ref.reshape(-1, 3).mean(0)).max() > 30
    cfg = CellConfig(crop_px=32, heads=("myeloblast",), stain_norm="reinhard", stain_target=target)
    cfg2 = CellConfig.from_json(json.loads(json.dumps(cfg.to_json())))
    assert cfg2.stain_norm == "reinhard" and cfg2.stain_target == target
    model = CellClassifier(cfg2)
    plain = CellClassifier(CellConfig(crop_px=32, heads=("myeloblast",)))
    plain.load_state_dict(model.state_dict())
    # the model with a stored normalisation sees the normalised crops: same as the plain one on them
    assert np.allclose(classify(model, other), classify(plain, out), atol=1e-5)


def test_paper_layout_round_trip(tmp_path):
    """A synthetic cohort written in the paper's layout (wsi.csv, labeled_cells.csv with set literals and
    [min_row, min_col, max_row, max_col] boxes) reads back to its truth, and trains cells, detector and
    slide-level nets. Three frames per group: a small camera frame can hold too few cells to be used
    (the selector rightly refuses it), and the nets need two usable patients per group."""
    from wsi_apl.paper_layout import paper_annotations, paper_cells, paper_entries, read_objects

    root = tmp_path / "paper"
    r = CliRunner().invoke(main, ["synth", str(root), "--plain", "--layout", "paper", "--mpp", "0.0668", "--size",
                                  "1024x768", "--diagnoses", "apl:3,aml:3,healthy:3", "--seed", "61"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lines = (root / "labeled_cells.csv").read_text().splitlines()
    assert lines[0] == "imgName,bbox,labels,objectType" and "{'" in lines[1] and "[" in lines[1]
    assert (root / "wsi.csv").read_text().splitlines()[0] == "id,imgName,label"
    objs = read_objects(root)
    truth = {json.loads(t.read_text())["file"]: json.loads(t.read_text()) for t in (root / "truth").glob("slide_*.json")}
    n_cells = sum(sum(c["type"] != "smudge" for c in t["cells"]) for t in truth.values())
    assert sum(o.object_type == "cell" for o in objs) == n_cells
    o = next(o for o in objs if o.object_type == "cell")
    c = next(c for c in truth[o.picture]["cells"] if c["type"] != "smudge")
    assert abs(o.box[0] - c["box"][0]) <= 1 and abs(o.box[1] - c["box"][1]) <= 1  # rows/cols turned into x/y
    cells = paper_cells(root, HEADS, None, 0.25)
    jp, ja = HEADS.index("promyelocyte"), HEADS.index("auer_rod")
    n_pro = sum(c["type"] == "promyelocyte" for t in truth.values() for c in t["cells"])
    n_auer = sum(bool(c["auer_rod"]) for t in truth.values() for c in t["cells"] if c["type"] != "smudge")
    assert cells.labels[:, jp].sum() == n_pro
    assert (n_auer == 0 and np.isnan(cells.labels[:, ja]).all()) or cells.labels[:, ja].sum() == n_auer
    assert set(cells.patients) == {t["patient"] for t in truth.values()}
    assert len(paper_annotations(root)) == 9
    assert {e.diagnosis for e in paper_entries(root)} == {"apl", "aml", "healthy"}
    # never eval: a label text that is code is refused, not run
    bad = root / "bad"
    bad.mkdir()
    shutil.copy(root / "wsi.csv", bad / "wsi.csv")
    (bad / "labeled_cells.csv").write_text(
        "imgName,bbox,labels,objectType\nx.png,\"[1, 2, 30, 40]\",\"__import__('os').getcwd()\",Cell\n")
    with pytest.raises(ValueError, match="set literal"):
        read_objects(bad)

    bundle = tmp_path / "bundle"
    run = CliRunner().invoke
    r = run(main, ["train", "detector", "--paper", str(root), "--out", str(bundle), "--mpp", "0.0668",
                   "--epochs", "1", "--test-fraction", "0.2"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "9 frames" in r.output
    r = run(main, ["train", "cells", "--paper", str(root), "--out", str(bundle), "--mpp", "0.0668",
                   "--area", "1024x768", "--epochs", "1"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = run(main, ["train", "enn", "--paper", str(root), "--bundle", str(bundle), "--min-cells", "5"],
            catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert load_bundle(bundle).has("slide_nets")
    r = run(main, ["evaluate", "cells", "--bundle", str(bundle), "--paper", str(root), "--json"],
            catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["heads"]["promyelocyte"]["n"] == n_cells
