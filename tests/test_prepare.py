"""``python -m data.prepare``: shards, sizes.json and manifest for shapes, digits and image folders."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import braceexpand
import numpy as np
import pytest
from PIL import Image

from data import builtin, prepare
from mm_lightning.data import synthetic
from mm_lightning.data.shards import list_shards

REPO = Path(__file__).resolve().parents[1]


def read_split(out: Path, manifest: dict, split: str) -> dict[str, dict[str, bytes]]:
    """``{key: {extension: bytes}}`` of one split, read with plain tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in braceexpand.braceexpand(manifest["splits"][split]["pattern"]):
        with tarfile.open(out / shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def check_layout(out: Path, manifest: dict, name: str, min_shards: int = 4) -> None:
    """sizes.json matches the shards and the manifest; each split has >= ``min_shards`` shards named as expected."""
    sizes = json.loads((out / "sizes.json").read_text())
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["name"] == name and {"classes", "image_size", "seed", "splits"} <= set(manifest)
    for split, entry in manifest["splits"].items():
        shards = list(braceexpand.braceexpand(entry["pattern"]))
        assert shards == sorted(p.name for p in out.glob(f"{name}-{split}-*.tar"))
        assert entry["num_shards"] == len(shards) >= min(min_shards, entry["num_samples"])
        assert sum(sizes[s] for s in shards) == entry["num_samples"] == len(read_split(out, manifest, split))
    assert sum(sizes.values()) == sum(e["num_samples"] for e in manifest["splits"].values())


def test_prepare_shapes(tmp_path: Path, no_network: None) -> None:
    out = tmp_path / "shapes"
    manifest = prepare.prepare_shapes(out, train=30, val=8, test=6, image_size=32, seed=1, progress=False)
    check_layout(out, manifest, "shapes")
    assert manifest["classes"] == list(synthetic.CLASS_NAMES) and manifest["image_size"] == 32
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == {"train": 30, "val": 8, "test": 6}
    assert manifest["splits"]["train"]["pattern"] == "shapes-train-{000000..000003}.tar"
    train = read_split(out, manifest, "train")
    sample = train["00000000"]
    assert set(sample) == {"png", "cls", "txt", "json"}
    assert Image.open(io.BytesIO(sample["png"])).size == (32, 32)
    meta = json.loads(sample["json"])
    assert int(sample["cls"]) == synthetic.CLASS_NAMES.index(meta["scene"]["shape"])
    expected = synthetic.make_sample(0, synthetic.split_seed(1, "train"), 32)
    assert sample["png"] == expected["png"] and sample["txt"].decode() == expected["txt"]
    pngs = {split: {s["png"] for s in read_split(out, manifest, split).values()} for split in ("val", "test")}
    assert not {s["png"] for s in train.values()} & (pngs["val"] | pngs["test"])

    # A rewrite with fewer samples and no val split leaves nothing stale behind.
    manifest = prepare.prepare_shapes(out, train=5, val=0, test=4, samples_per_shard=2, progress=False)
    check_layout(out, manifest, "shapes", min_shards=0)
    assert set(manifest["splits"]) == {"train", "test"} and manifest["splits"]["train"]["num_shards"] == 3
    assert not list(out.glob("shapes-val-*.tar"))


def test_prepare_shapes_rejects_bad_numbers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--train"):
        prepare.prepare_shapes(tmp_path, train=-1, progress=False)
    with pytest.raises(ValueError, match="--image-size"):
        prepare.prepare_shapes(tmp_path, image_size=8, progress=False)


def test_default_samples_per_shard() -> None:
    assert prepare.default_samples_per_shard(10000) == 1000
    assert prepare.default_samples_per_shard(1000) == 250
    assert prepare.default_samples_per_shard(1437) == 360 and prepare.default_samples_per_shard(1) == 1
    for n in range(1, 200):
        per_shard = prepare.default_samples_per_shard(n)
        assert -(-n // per_shard) >= min(4, n), n


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test: preparing data never downloads."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("data.prepare tried to open a network connection")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_prepare_digits_is_stratified(tmp_path: Path, no_network: None) -> None:
    from sklearn.datasets import load_digits

    out = tmp_path / "digits"
    manifest = prepare.prepare_digits(out, image_size=16, seed=0, progress=False)
    check_layout(out, manifest, "digits")
    assert manifest["classes"] == [str(d) for d in range(10)]
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == {"train": 1437, "val": 180, "test": 180}
    class_sizes = Counter(int(t) for t in load_digits().target)
    keys = set()
    for split in ("train", "val", "test"):
        samples = read_split(out, manifest, split)
        assert not keys & set(samples)
        keys |= set(samples)
        counts = Counter(int(s["cls"]) for s in samples.values())
        share = len(samples) / 1797
        slack = 2 if split == "train" else 1  # train takes both the val and the test rounding
        assert all(abs(counts[c] - share * class_sizes[c]) <= slack for c in range(10)), (split, counts)
    first = next(iter(read_split(out, manifest, "test").values()))
    image = Image.open(io.BytesIO(first["png"]))
    assert image.mode == "RGB" and image.size == (16, 16) and np.asarray(image).max() > 200


def make_folder(root: Path) -> dict[str, bytes]:
    """An ImageFolder tree with classes that sort case-sensitively, PNG + JPEG, and a nested folder."""
    files: dict[str, bytes] = {}
    rng = np.random.default_rng(0)
    for c, name in enumerate(["b", "A", "c"]):
        for i in range(10):
            image = Image.fromarray(rng.integers(0, 255, (20 + c, 24, 3), dtype=np.uint8))
            ext = "png" if i % 2 else "jpeg"
            path = root / name / ("sub" if i == 9 else "") / f"img{i}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            files[str(path.relative_to(root))] = path.read_bytes()
    (root / "A" / "notes.txt").write_text("not an image, ignored")
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / "c" / "extra.bmp")
    files["c/extra.bmp"] = (root / "c" / "extra.bmp").read_bytes()
    return files


def test_prepare_images_keeps_bytes_and_classes(tmp_path: Path) -> None:
    files = make_folder(tmp_path / "src")
    out = tmp_path / "out"
    manifest = prepare.prepare_images(tmp_path / "src", out, val_fraction=0.2, test_fraction=0.2, progress=False)
    check_layout(out, manifest, "src")
    assert manifest["classes"] == ["A", "b", "c"]  # torchvision's ImageFolder order
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == {"train": 19, "val": 6, "test": 6}
    seen = 0
    for split in ("train", "val", "test"):
        for sample in read_split(out, manifest, split).values():
            meta = json.loads(sample["json"])
            assert meta["path"].startswith(meta["class"] + "/")
            if meta["path"].endswith(".bmp"):  # not read by the sample pipelines: re-encoded as PNG
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))),
                                      np.asarray(Image.open(io.BytesIO(files[meta["path"]]))))
            else:
                assert sample["jpg" if meta["path"].endswith(".jpeg") else "png"] == files[meta["path"]]
            assert manifest["classes"][int(sample["cls"])] == meta["class"]
            seen += 1
    assert seen == len(files)


def test_prepare_images_resizes(tmp_path: Path) -> None:
    make_folder(tmp_path / "src")
    manifest = prepare.prepare_images(tmp_path / "src", tmp_path / "out", image_size=16, name="my data",
                                      progress=False)
    sample = next(iter(read_split(tmp_path / "out", manifest, "train").values()))
    ext = "jpg" if "jpg" in sample else "png"
    assert Image.open(io.BytesIO(sample[ext])).size == (16, 16) and manifest["image_size"] == 16
    assert all(Path(s).name.startswith("my_data-") for s in list_shards(str(tmp_path / "out")))


def test_prepare_images_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare.prepare_images(tmp_path / "nowhere", tmp_path / "out", progress=False)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no class folders"):
        prepare.prepare_images(tmp_path / "flat", tmp_path / "out", progress=False)
    make_folder(tmp_path / "src")
    (tmp_path / "src" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        prepare.prepare_images(tmp_path / "src", tmp_path / "out", progress=False)
    (tmp_path / "src" / "empty" / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        prepare.prepare_images(tmp_path / "src", tmp_path / "out", progress=False)
    (tmp_path / "src" / "empty" / "broken.jpg").unlink()
    (tmp_path / "src" / "empty").rmdir()
    with pytest.raises(ValueError, match="inside --src"):
        prepare.prepare_images(tmp_path / "src", tmp_path / "src" / "shards", progress=False)


def test_cli_shapes(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "data.prepare", "shapes", "--out", str(out), "--train", "40",
                          "--val", "8", "--test", "8"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "shapes-train-{000000..000003}.tar" in run.stdout and "shapes train" in run.stderr  # progress bar
    manifest = json.loads((out / "manifest.json").read_text())
    check_layout(out, manifest, "shapes")
    assert manifest["splits"]["train"]["num_samples"] == 40


def test_cli_errors_exit_2_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["images", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--src" in err and "missing" in err
    with pytest.raises(SystemExit):
        prepare.main(["shapes", "--out", str(tmp_path / "o"), "--val", "-3"])
    assert "--val" in capsys.readouterr().err


@pytest.fixture()
def small_builtins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Run in tmp_path, with the built-in preparers shrunk and their calls recorded."""
    monkeypatch.chdir(tmp_path)
    calls: dict[str, list] = {"shapes": [], "digits": []}

    def shapes(**kw):
        calls["shapes"].append(kw)
        return prepare.prepare_shapes(**{"train": 8, "val": 4, "test": 4, "progress": False, **kw})

    def digits(**kw):
        calls["digits"].append(kw)
        return prepare.prepare_digits(**{"image_size": 8, "progress": False, **kw})

    monkeypatch.setitem(builtin.BUILTIN_DATASETS, "data/shards/shapes", shapes)
    monkeypatch.setitem(builtin.BUILTIN_DATASETS, "data/shards/digits", digits)
    return calls


def test_ensure_builtin_generates_default_locations_once(tmp_path: Path, small_builtins: dict[str, list],
                                                         capsys: pytest.CaptureFixture) -> None:
    spec = "data/shards/shapes/shapes-train-{000000..000003}.tar"
    assert builtin.ensure_builtin(spec) is True
    assert "data/shards/shapes" in capsys.readouterr().err
    assert small_builtins["shapes"] == [{"out_dir": "data/shards/shapes"}]
    assert len(list_shards(spec)) == 4
    assert builtin.ensure_builtin(spec) is False and builtin.ensure_builtin("./data/shards/shapes") is False
    assert len(small_builtins["shapes"]) == 1
    # An absolute path, inside a list and a '::' join, counts too.
    absolute = str(tmp_path / "data" / "shards" / "digits" / "digits-train-*.tar")
    assert builtin.ensure_builtin(["somewhere/else.tar::" + absolute]) is True
    assert len(small_builtins["digits"]) == 1 and (tmp_path / "data/shards/digits/manifest.json").is_file()


def test_ensure_builtin_ignores_other_paths(tmp_path: Path, small_builtins: dict[str, list]) -> None:
    for spec in ("data/shards/mine/x-{000000..000003}.tar", "data/shards", "data/shards/shapes2",
                 str(tmp_path / "elsewhere" / "data" / "shards" / "shapes"), ["a.tar", "b/*.tar"]):
        assert builtin.ensure_builtin(spec) is False, spec
    assert small_builtins == {"shapes": [], "digits": []}
    assert not (tmp_path / "data" / "shards" / "shapes").exists()


def test_ensure_builtin_completes_an_interrupted_run(tmp_path: Path, small_builtins: dict[str, list]) -> None:
    prepare.prepare_shapes("data/shards/shapes", train=8, val=4, test=4, progress=False)
    (tmp_path / "data/shards/shapes/manifest.json").unlink()  # as if stopped before the end
    assert not builtin.is_prepared("data/shards/shapes")
    assert builtin.ensure_builtin("data/shards/shapes") is True and builtin.is_prepared("data/shards/shapes")


def test_prepare_functions_are_the_builtin_defaults() -> None:
    assert builtin.BUILTIN_DATASETS["data/shards/shapes"] is prepare.prepare_shapes
    assert builtin.BUILTIN_DATASETS["data/shards/digits"] is prepare.prepare_digits


def test_cli_tokenizer_trains_on_existing_shards(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``python -m data.prepare tokenizer --shards ... --out ...``: a BPE of the shards' captions; errors name --shards."""
    from mm_lightning.data.tokenizer import TextTokenizer

    prepare.prepare_shapes(tmp_path / "shapes", train=24, val=4, test=4, progress=False)
    out = tmp_path / "tok" / "tokenizer.json"
    result = prepare.main(["tokenizer", "--shards", str(tmp_path / "shapes" / "shapes-train-*.tar"), "--out", str(out),
                           "--vocab-size", "300"])
    tokenizer = TextTokenizer(out)
    assert result == {"tokenizer": str(out), "vocab_size": tokenizer.vocab_size} and tokenizer.vocab_size <= 300
    assert f"written to {out}" in capsys.readouterr().out
    assert tokenizer.decode(tokenizer(["a red circle"])["input_ids"][0]) == "a red circle"
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["tokenizer", "--shards", str(tmp_path / "none-*.tar"), "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and "--shards" in capsys.readouterr().err


def test_stratified_split_keeps_class_shares_and_single_items_in_train() -> None:
    """scikit-learn's stratified split: per class, test and val take their share (within one item of rounding);
    a class with one item stays in train; the splits partition the indices."""
    labels = [0] * 50 + [1] * 30 + [2] * 20 + [3]
    parts = prepare.stratified_split(labels, val_fraction=0.2, test_fraction=0.1, seed=0)
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == list(range(len(labels)))
    assert (len(parts["test"]), len(parts["val"])) == (10, 20)
    for split, share in (("test", 0.1), ("val", 0.2)):
        counts = Counter(labels[i] for i in parts[split])
        assert all(abs(counts[c] - share * n) <= 1 for c, n in ((0, 50), (1, 30), (2, 20))), (split, counts)
    assert 100 in parts["train"]  # the single item of class 3
    assert parts == prepare.stratified_split(labels, 0.2, 0.1, seed=0)  # seeded
