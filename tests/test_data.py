import hashlib
import http.server
import io
import pickle
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import (Archive, ArrayDataset, DataConfig, ImageFolderDataset, Loader, build_data,
                         eval_transform, load_image)
from vitlab.data.augment import mix, pad_crop, random_resized_crop, randaugment
from vitlab.data.cifar import read_binary

ROOT = Path(__file__).resolve().parents[1]
NAMES10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------- fixtures made here

def records(n, label_bytes, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10 if label_bytes == 1 else 100, (n, label_bytes), dtype=np.uint8)
    labels[:, -1] = np.arange(n) % (10 if label_bytes == 1 else 100)
    pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return np.concatenate([labels, pixels], 1), labels[:, -1], pixels


def write_cifar10_binary(root: Path, per_batch=4, n_test=10):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        (root / f"data_batch_{i}.bin").write_bytes(records(per_batch, 1, i)[0].tobytes())
    rec, labels, pixels = records(n_test, 1, 99)
    (root / "test_batch.bin").write_bytes(rec.tobytes())
    (root / "batches.meta.txt").write_text("\n".join(NAMES10) + "\n\n")
    return labels, pixels


def write_cifar10_python(root: Path, protocol=2, per_batch=4):
    root.mkdir(parents=True, exist_ok=True)
    for name, seed in [(f"data_batch_{i}", i) for i in range(1, 6)] + [("test_batch", 99)]:
        _, labels, pixels = records(per_batch, 1, seed)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": pixels, b"labels": [int(v) for v in labels], b"batch_label": b"x"},
                        f, protocol=protocol)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in NAMES10]}, f, protocol=protocol)


def save(path: Path, img: Image.Image, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def rgb(color, size=(40, 30)):
    return Image.new("RGB", size, color)


def image_folder(root: Path, splits=("train", "val"), per_class=3):
    """root/<split>/<class>/ with PNG, JPEG, WebP and BMP files."""
    kinds = [("png", {}), ("jpg", {"quality": 95}), ("webp", {}), ("bmp", {})]
    for split in splits:
        for c, color in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
            for i in range(per_class):
                ext, kw = kinds[i % len(kinds)]
                save(root / split / c / f"{i}.{ext}", rgb(color, (40 + 4 * i, 30)), **kw)
    return root


# ---------------------------------------------------------------- CIFAR formats

def test_cifar10_binary(tmp_path):
    labels, pixels = write_cifar10_binary(tmp_path / "cifar-10-batches-bin")
    data = build_data(DataConfig(path=str(tmp_path)), log=lambda s: None)  # parent folder works too
    assert data.class_names == NAMES10
    assert isinstance(data.train, ArrayDataset) and data.train.images.shape == (20, 3, 32, 32)
    assert data.val is None and len(data.test) == 10
    assert data.test.labels.tolist() == labels.tolist()
    assert torch.equal(data.test.images[3], torch.from_numpy(pixels[3]).view(3, 32, 32))  # R, G, B planes


def test_cifar100_binary_uses_fine_labels(tmp_path):
    root = tmp_path / "cifar-100-binary"
    root.mkdir()
    rec, fine, pixels = records(7, 2, 1)
    rec[:, 0] = 3  # coarse label: must be ignored
    (root / "train.bin").write_bytes(rec.tobytes())
    (root / "test.bin").write_bytes(rec[:5].tobytes())
    (root / "fine_label_names.txt").write_text("\n".join(f"c{i}" for i in range(100)))
    data = build_data(DataConfig(path=str(root)), log=lambda s: None)
    assert data.train.labels.tolist() == fine.tolist() and len(data.class_names) == 100
    assert torch.equal(data.train.images[6].flatten(), torch.from_numpy(pixels[6]))


def test_truncated_cifar_binary_is_a_clear_error(tmp_path):
    root = tmp_path / "c"
    write_cifar10_binary(root)
    (root / "data_batch_3.bin").write_bytes(b"\x01" * 5000)
    with pytest.raises(ValueError, match="data_batch_3.bin.*truncated"):
        build_data(DataConfig(path=str(root)), log=lambda s: None)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_python_layout(tmp_path, protocol):
    write_cifar10_python(tmp_path / "cifar-10-batches-py", protocol)
    binary = tmp_path / "bin"
    write_cifar10_binary(binary)  # same seeds: same records
    a = build_data(DataConfig(path=str(tmp_path / "cifar-10-batches-py")), log=lambda s: None)
    b = build_data(DataConfig(path=str(binary)), log=lambda s: None)
    assert a.class_names == NAMES10
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.train.labels, b.train.labels)


def test_cifar100_python_layout(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for name, n in (("train", 6), ("test", 4)):
        _, fine, pixels = records(n, 2, n)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": pixels, b"fine_labels": fine.tolist(), b"coarse_labels": [0] * n}, f, protocol=2)
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f, protocol=2)
    data = build_data(DataConfig(path=str(root)), log=lambda s: None)
    assert data.class_names[:2] == ["c0", "c1"] and len(data.class_names) == 100
    assert data.train.labels.tolist() == list(range(6)) and data.test.images.shape == (4, 3, 32, 32)


class Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').close()",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "cifar-10-batches-py"
    write_cifar10_python(root)
    with open(root / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f, protocol=2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="refusing to load .*exec"):
        build_data(DataConfig(path=str(root)), log=lambda s: None)
    assert not (tmp_path / "PWNED").exists()


def real_cifar10():
    for base in (ROOT.parent, ROOT.parent.parent):
        path = base / "shared" / "data" / "cifar-10-batches-bin"
        if (path / "test_batch.bin").exists():
            return path
    return None


@pytest.mark.skipif(real_cifar10() is None, reason="no ../shared/data/cifar-10-batches-bin")
def test_real_cifar10_test_batch():
    images, labels = read_binary([real_cifar10() / "test_batch.bin"], 1)
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.bincount().tolist() == [1000] * 10
    assert (real_cifar10() / "batches.meta.txt").read_text().split() == NAMES10


# ---------------------------------------------------------------- images and folders

def test_load_image_modes_and_exif(tmp_path):
    base = rgb((10, 200, 10))
    paths = {
        "gray": save(tmp_path / "g.png", base.convert("L")),
        "rgba": save(tmp_path / "a.png", base.convert("RGBA")),
        "palette": save(tmp_path / "p.png", base.convert("P"), transparency=0),
        "webp": save(tmp_path / "w.webp", base),
        "bmp": save(tmp_path / "b.bmp", base),
    }
    for name, path in paths.items():
        img = load_image(path)
        assert img.mode == "RGB" and img.size == (40, 30), name
    # 40x20 stored sideways: left half red, right half blue; orientation 6 = rotate 90 deg clockwise
    sideways = Image.new("RGB", (40, 20), (0, 0, 255))
    sideways.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    img = load_image(save(tmp_path / "r.jpg", sideways, exif=exif, quality=95))
    assert img.size == (20, 40)
    top, bottom = np.asarray(img)[5, 10], np.asarray(img)[35, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_unreadable_images_raise_naming_the_path(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    good = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(good, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    for path in (garbage, truncated):
        with pytest.raises(ValueError, match=path.name):
            load_image(path)


def test_image_folder_with_val_and_test_splits(tmp_path):
    root = image_folder(tmp_path / "ds", splits=("train", "val", "test"))
    (root / "train" / "cat" / "notes.txt").write_text("ignored")
    messages = []
    data = build_data(DataConfig(path=str(root)), log=messages.append)
    assert data.class_names == ["cat", "dog"]
    assert isinstance(data.train, ImageFolderDataset)
    assert (len(data.train), len(data.val), len(data.test)) == (6, 6, 6)
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert any("skipped 1 non-image" in m and "notes.txt" in m for m in messages)
    image, label = data.val[4]
    assert image.mode == "RGB" and label == 1


def test_val_folder_serves_as_test_when_no_test(tmp_path):
    data = build_data(DataConfig(path=str(image_folder(tmp_path / "ds"))), log=lambda s: None)
    assert data.val is not None and data.test is data.val


def test_single_tree_stratified_seeded_split(tmp_path):
    root = tmp_path / "ds"
    for c, n in (("a", 10), ("b", 20), ("c", 5)):
        for i in range(n):
            save(root / c / f"{i}.png", rgb((i, 0, 0), (8, 8)))
    cfg = DataConfig(path=str(root), val_split=0.2, seed=1)
    data = build_data(cfg, log=lambda s: None)
    assert data.val.labels.bincount().tolist() == [2, 4, 1]
    assert data.train.labels.bincount().tolist() == [8, 16, 4]
    assert not {p for p, _ in data.val.samples} & {p for p, _ in data.train.samples}
    again = build_data(cfg, log=lambda s: None)
    assert again.val.samples == data.val.samples
    other = build_data(DataConfig(path=str(root), val_split=0.2, seed=2), log=lambda s: None)
    assert other.val.samples != data.val.samples
    assert data.test is None


def test_cifar_val_split(tmp_path):
    write_cifar10_binary(tmp_path / "c", per_batch=10)  # 5 per class
    data = build_data(DataConfig(path=str(tmp_path / "c"), val_split=0.2), log=lambda s: None)
    assert len(data.val) == 10 and len(data.train) == 40 and len(data.test) == 10
    assert data.val.labels.bincount().tolist() == [1] * 10


def test_clear_errors_before_training(tmp_path):
    quiet = {"log": lambda s: None}
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist.*cifar10"):
        build_data(DataConfig(path=str(tmp_path / "nowhere")), **quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        build_data(DataConfig(path=str(tmp_path / "empty")), **quiet)
    root = image_folder(tmp_path / "a")
    (root / "train" / "bird").mkdir()
    with pytest.raises(ValueError, match="bird has no images"):
        build_data(DataConfig(path=str(root)), **quiet)
    root = image_folder(tmp_path / "b")
    for f in (root / "val" / "dog").iterdir():
        f.unlink()
    (root / "val" / "dog").rmdir()
    with pytest.raises(ValueError, match=r"val has no folder for class\(es\) \['dog'\]"):
        build_data(DataConfig(path=str(root)), **quiet)
    root = tmp_path / "tiny"
    save(root / "a" / "0.png", rgb((0, 0, 0)))
    save(root / "b" / "0.png", rgb((0, 0, 0)))
    save(root / "b" / "1.png", rgb((0, 0, 0)))
    with pytest.raises(ValueError, match="class 'a' has 1 image"):
        build_data(DataConfig(path=str(root), val_split=0.5), **quiet)
    with pytest.raises(ValueError, match="crop must be one of"):
        DataConfig(crop="random")


# ---------------------------------------------------------------- classes and train_subset

def test_classes_keep_and_relabel_every_split_in_the_order_given(tmp_path):
    root = tmp_path / "c"
    write_cifar10_binary(root, per_batch=10, n_test=20)  # 5 train and 2 test images per class
    full = build_data(DataConfig(path=str(root)), log=lambda s: None)
    messages = []
    data = build_data(DataConfig(path=str(root), classes=(7, 2, 9)), log=messages.append)
    assert data.class_names == ["horse", "bird", "truck"] and data.num_classes == 3
    assert (len(data.train), len(data.test)) == (15, 6)
    for split, whole in ((data.train, full.train), (data.test, full.test)):
        original = torch.tensor([7, 2, 9])[split.labels]  # label i is class (7, 2, 9)[i]
        kept = torch.isin(whole.labels, torch.tensor([7, 2, 9])).nonzero().flatten()
        assert torch.equal(original, whole.labels[kept]) and torch.equal(split.images, whole.images[kept])
    assert any("classes 7, 2, 9 of 10 (horse, bird, truck), relabelled 0-2" in m for m in messages)
    folder = build_data(DataConfig(path=str(image_folder(tmp_path / "f", splits=("train", "val"))), classes=(1, 0)),
                        log=lambda s: None)
    assert folder.class_names == ["dog", "cat"] and folder.train.labels.tolist() == [1, 1, 1, 0, 0, 0]
    assert folder.test is folder.val and all("/dog/" in p for p, y in folder.val.samples if y == 0)


def test_train_subset_is_balanced_seeded_nested_and_leaves_test_alone(tmp_path):
    root = tmp_path / "c"
    write_cifar10_binary(root, per_batch=20, n_test=10)  # 10 train images per class
    quiet = {"log": lambda s: None}

    def subset(n, seed=0, **kw):
        return build_data(DataConfig(path=str(root), train_subset=n, seed=seed, **kw), **quiet)

    small, large = subset(20), subset(40)
    assert small.train.labels.bincount().tolist() == [2] * 10 and len(large.train) == 40 and len(small.test) == 10
    full = build_data(DataConfig(path=str(root)), **quiet)
    rows = lambda d: {tuple(x.flatten()[:64].tolist()) for x in d.train.images}  # noqa: E731
    assert rows(small) < rows(large) < rows(full)  # nested in the size, for one seed
    assert torch.equal(subset(20).train.images, small.train.images)
    assert rows(subset(20, seed=1)) != rows(small)
    assert len(subset(100).train) == 100 and rows(subset(100)) == rows(full)
    both = subset(15, classes=(5, 6, 7), val_split=0.2)  # classes first, then the subset, then val from it
    assert both.class_names == ["dog", "frog", "horse"] and both.val.labels.bincount().tolist() == [1, 1, 1]
    assert both.train.labels.bincount().tolist() == [4, 4, 4] and len(both.test) == 3


def test_classes_and_train_subset_errors_name_the_value(tmp_path):
    root = tmp_path / "c"
    write_cifar10_binary(root, per_batch=10)
    quiet = {"log": lambda s: None}
    for kw, message in [(dict(classes=(1, 2, 1)), r"classes lists \[1\] more than once"),
                        (dict(classes=(3,)), r"classes \(3,\) keeps one class"),
                        (dict(classes=(-1, 2)), r"class indices >= 0, got \(-1, 2\)"),
                        (dict(train_subset=-5), "train_subset must be a number of images >= 0")]:
        with pytest.raises(ValueError, match=message):
            DataConfig(path=str(root), **kw)
    for kw, message in [(dict(classes=(2, 10, 12)), r"classes \[10, 12\] out of range: .* 10 classes, indices 0-9"),
                        (dict(train_subset=51), "train_subset 51 is larger than the training set \\(50 images\\)"),
                        (dict(train_subset=26, classes=(0, 1, 2, 3, 4)),
                         r"larger than the training set \(25 images of the kept classes\)"),
                        (dict(train_subset=23), r"train_subset 23 does not divide evenly into the 10 classes; use a "
                                                r"multiple of 10 \(e.g. 20 or 30\)")]:
        with pytest.raises(ValueError, match=message):
            build_data(DataConfig(path=str(root), **kw), **quiet)
    uneven = tmp_path / "u"
    for c, n in (("a", 4), ("b", 2)):
        for i in range(n):
            save(uneven / c / f"{i}.png", rgb((i, 0, 0), (8, 8)))
    with pytest.raises(ValueError, match="needs 3 training images of each class, but class 'b' has 2; use at most 4"):
        build_data(DataConfig(path=str(uneven), train_subset=6), **quiet)


# ---------------------------------------------------------------- download

class Server:
    """A local HTTP server: ``routes[path] = (bytes, declared_length)``; counts requests."""

    def __init__(self):
        self.routes, self.hits = {}, 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits += 1
                body, length = server.routes[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)  # fewer bytes than declared: a truncated transfer
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def tiny_archive(tmp_path) -> bytes:
    write_cifar10_binary(tmp_path / "src" / "cifar-10-batches-bin")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    return buf.getvalue()


def test_download_good_corrupt_truncated_and_offline(tmp_path, server):
    body = tiny_archive(tmp_path)
    digest = hashlib.sha256(body).hexdigest()
    corrupt = bytearray(body)
    corrupt[len(body) // 2] ^= 0xFF
    server.routes = {"/good.tgz": (body, len(body)), "/bad.tgz": (bytes(corrupt), len(body)),
                     "/short.tgz": (body[:100], len(body))}
    quiet = {"log": lambda s: None}

    def archives(route, url=None):
        return {"cifar10": Archive(url or server.url + route, "sha256", digest, "cifar-10-batches-bin")}

    for route, match in (("/bad.tgz", "sha256 mismatch"), ("/short.tgz", "truncated|download failed")):
        cache = tmp_path / f"cache{route[1:4]}"
        with pytest.raises(ValueError, match=f"({match}).*{route}.*--data PATH"):
            build_data(DataConfig(path="cifar10", cache_dir=str(cache)), archives=archives(route), **quiet)
        assert list(cache.iterdir()) == []  # nothing half-made is left behind

    cache = tmp_path / "cache"
    data = build_data(DataConfig(path="cifar10", cache_dir=str(cache)), archives=archives("/good.tgz"), **quiet)
    assert len(data.train) == 20 and data.class_names == NAMES10
    assert [p.name for p in cache.iterdir()] == ["cifar-10-batches-bin"]
    hits = server.hits
    build_data(DataConfig(path="cifar10", cache_dir=str(cache)), archives=archives("/good.tgz"), **quiet)
    assert server.hits == hits  # cached: no second download

    closed = "http://127.0.0.1:9/cifar-10-binary.tar.gz"  # discard port: nothing listens
    start = time.monotonic()
    with pytest.raises(ValueError, match="download failed.*127.0.0.1:9/cifar-10-binary.*--data PATH"):
        build_data(DataConfig(path="cifar10", cache_dir=str(tmp_path / "c2")),
                   archives=archives("", url=closed), **quiet)
    assert time.monotonic() - start < 10


# ---------------------------------------------------------------- loader

def indexed_images(n, size=32):
    """Image i is constant i: recover the sample order from a batch."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return ArrayDataset(images, torch.arange(n) % 4, ["a", "b", "c", "d"])


def recover(x):
    """Undo the default normalisation: the constant of each image."""
    return ((x[:, 0, 0, 0] * 0.5 + 0.5) * 255).round().long().tolist()


def test_repeated_augmentation_puts_each_drawn_image_r_times_in_one_batch_augmented_apart():
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.arange(30) % 10, NAMES10)
    loader = Loader(data, DataConfig(repeated_aug=3, seed=1), batch_size=6, train=True, num_classes=10)
    order = loader.indices(0)
    assert len(order) == 30 and len(set(order.tolist())) == 10  # a third of the images, 3 times each
    assert all(len(set(order[i:i + 3].tolist())) == 1 for i in range(0, 30, 3))  # side by side
    assert not torch.equal(loader.indices(0), loader.indices(1))
    x, _ = next(iter(loader.epoch(0)))
    assert not torch.equal(x[0], x[1])  # the copies get their own crop and flip
    two = [Loader(data, DataConfig(repeated_aug=3, seed=1), batch_size=3, train=True, num_classes=10, rank=r,
                  world_size=2).indices(0) for r in (0, 1)]
    assert torch.equal(two[0][:5], order[0:10:2]) and torch.equal(two[1][:5], order[1:10:2])  # DeiT's ranks
    with pytest.raises(ValueError, match="repeated_aug must be a repeat count >= 1"):
        DataConfig(repeated_aug=0)


def test_resume_mid_epoch_is_bitwise_identical_in_memory():
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.arange(40) % 10, NAMES10)
    for cfg in (DataConfig(randaugment_n=2, mixup=0.8, cutmix=1.0, seed=3),
                DataConfig(crop="rrc", image_size=48, randaugment_n=1, cutmix=1.0)):
        loader = Loader(data, cfg, batch_size=8, train=True, num_classes=10)
        state = torch.get_rng_state()
        full = list(loader.epoch(2))
        assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
        assert len(full) == len(loader) == 5
        tail = list(loader.epoch(2, start_batch=3))
        assert len(tail) == 2
        for (x, y), (x2, y2) in zip(full[3:], tail):
            assert torch.equal(x, x2) and torch.equal(y, y2)
        x, y = full[0]
        assert x.shape == (8, 3, cfg.image_size, cfg.image_size) and x.dtype == torch.float32
        assert y.shape == (8, 10) and y.dtype == torch.float32
        assert torch.allclose(y.sum(1), torch.ones(8))
        assert not torch.equal(list(loader.epoch(3))[0][0], x)  # another epoch, other batches
    with pytest.raises(ValueError, match="start_batch 6 out of range"):
        loader.epoch(0, start_batch=6)
    with pytest.raises(ValueError, match="less than one batch of 64"):
        Loader(data, DataConfig(), batch_size=64, train=True, num_classes=10)
    with pytest.raises(ValueError, match="label 9 but num_classes is 5"):
        Loader(data, DataConfig(), batch_size=8, train=True, num_classes=5)


def test_train_order_is_seeded_and_shards_are_disjoint():
    data = indexed_images(50)
    cfg = DataConfig(crop="none", hflip=False)
    one = Loader(data, cfg, batch_size=4, train=True, num_classes=4)
    order = [i for x, _ in one.epoch(0) for i in recover(x)]
    assert order == [i for x, _ in one.epoch(0) for i in recover(x)]
    assert order != [i for x, _ in one.epoch(1) for i in recover(x)]
    assert sorted(order) != order and len(set(order)) == len(order) == 48  # drop_last
    seen = []
    for rank in range(3):
        loader = Loader(data, cfg, batch_size=4, train=True, num_classes=4, rank=rank, world_size=3)
        assert len(loader) == 4  # 50 // 3 = 16 samples per rank
        seen.append([i for x, y in loader.epoch(0) for i in recover(x)])
        assert all(len(s) == 16 for s in seen)
    flat = [i for s in seen for i in s]
    assert len(set(flat)) == len(flat) == 48


def test_eval_sees_every_sample_once_across_ranks_in_order():
    data = indexed_images(11)
    seen = []
    for rank in range(3):
        loader = Loader(data, DataConfig(), batch_size=2, train=False, num_classes=4, rank=rank, world_size=3)
        batches = list(loader.epoch(0))
        assert len(batches) == len(loader)
        seen.append([i for x, _ in batches for i in recover(x)])
        assert all(y.dtype == torch.int64 for _, y in batches)
    assert seen == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]


def test_pad_crop_is_a_crop_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g)
    out = pad_crop(x, 2, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(6):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert matches
        offsets.add(matches[0])
    assert len(offsets) > 1


def test_batched_ops_shapes_and_determinism():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a = random_resized_crop(x, 24, (0.08, 1.0), torch.Generator().manual_seed(1))
    b = random_resized_crop(x, 24, (0.08, 1.0), torch.Generator().manual_seed(1))
    assert a.shape == (16, 3, 24, 24) and a.dtype == torch.uint8 and torch.equal(a, b)
    tall = x[:, :, :, :8]  # 32 x 8: no crop of the whole area fits, so the centre square is used
    assert torch.equal(random_resized_crop(tall, 8, (1.0, 1.0), torch.Generator()), tall[:, :, 12:20])
    r = randaugment(x, 2, 9, torch.Generator().manual_seed(5))
    assert r.shape == x.shape and r.dtype == torch.uint8
    assert torch.equal(r, randaugment(x, 2, 9, torch.Generator().manual_seed(5)))
    assert not torch.equal(r, x)


def test_mixup_and_cutmix_targets_match_the_pixels():
    x = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16)])  # image 0 black, image 1 white
    y = torch.tensor([0, 1])
    mixed, target = mix(x, y, 3, 0.8, 0.0, np.random.default_rng(0))
    lam = target[0, 0].item()
    assert 0 < lam < 1 and torch.allclose(mixed[0], torch.full((3, 16, 16), 1 - lam))
    assert torch.allclose(target, torch.tensor([[lam, 1 - lam, 0], [1 - lam, lam, 0]]))
    for seed in range(5):
        cut, target = mix(x, y, 3, 0.0, 1.0, np.random.default_rng(seed))
        assert set(cut.unique().tolist()) <= {0.0, 1.0}
        assert torch.isclose(target[0, 1], cut[0].mean())  # the share pasted from the white image
        assert torch.allclose(target.sum(1), torch.ones(2)) and target[0, 2] == 0


def test_streamed_folder_skips_bad_images_and_resumes_exactly(tmp_path):
    root = image_folder(tmp_path / "ds", splits=("train",), per_class=5)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    data = build_data(DataConfig(path=str(root)), log=lambda s: None)
    messages = []
    cfg = DataConfig(path=str(root), image_size=24, crop="rrc", randaugment_n=2, mixup=0.5)
    loader = Loader(data.train, cfg, batch_size=3, train=False, num_classes=2, log=messages.append)
    batches = list(loader.epoch(0))
    assert sum(len(x) for x, _ in batches) == 10  # 11 files, one unreadable
    assert len(loader.skipped) == 1 and "broken.jpg" in loader.skipped[0]
    assert any("broken.jpg" in m for m in messages) and any("skipped 1 unreadable" in m for m in messages)
    assert batches[0][0].shape == (3, 3, 24, 24)

    train = Loader(data.train, cfg, batch_size=3, train=True, num_classes=2, log=lambda s: None)
    state = torch.get_rng_state()
    full = list(train.epoch(1))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    tail = list(train.epoch(1, start_batch=2))
    assert len(full) == 3 and len(tail) == 1
    assert torch.equal(full[2][0], tail[0][0]) and torch.equal(full[2][1], tail[0][1])
    assert full[0][1].shape[1] == 2  # soft targets
    workers = Loader(data.train, DataConfig(**{**cfg.__dict__, "num_workers": 2}), batch_size=3,
                     train=True, num_classes=2, log=lambda s: None)
    for (x, y), (x2, y2) in zip(full, workers.epoch(1)):
        assert torch.equal(x, x2) and torch.equal(y, y2)  # same batches with worker processes


def test_eval_transform_matches_in_memory_eval():
    img = Image.effect_noise((48, 40), 60).convert("RGB")
    x = eval_transform(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    tensor = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]
    data = ArrayDataset(tensor, torch.zeros(1, dtype=torch.int64), ["a"])
    (batch, _), = Loader(data, DataConfig(), batch_size=1, train=False, num_classes=1).epoch(0)
    assert torch.equal(batch[0], x)
