"""What a bundle trusts and what it refuses (docs/bundles.md): `compile -o` replaces only a bundle
graphopt wrote, every file the loader opens is listed with its sha256 under a plain name inside the
bundle, the manifest's digest pins it, malformed manifests and damaged files are one-line exit-2
refusals (in graphopt and in the standalone loader.py), and calls from fresh threads stay bounded.

One small bundle (a conv net at 224x224: large enough that TVM runs its kernels on its thread pool)
is compiled once per module and copied per case.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from compile_nets import conv_net, ort_run

from graphopt.front import api
from graphopt.backends.bundle import BundleError, loader
from graphopt.front.cli import main

RTOL, ATOL = 1e-3, 1e-4


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: relative path -> sha256 of a file, 'dir', or 'link -> target'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"link -> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _refused(code: int, err: str, *parts: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust")
    model = conv_net(d / "conv.onnx", size=224)
    bundle = d / "conv.bundle"
    api.compile(model, output=bundle, opt_level=1)
    digest = "sha256:" + hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    x = np.random.default_rng(3).standard_normal((1, 3, 224, 224)).astype(np.float32)
    np.savez(d / "in.npz", x=x)
    return d, model, bundle, digest, x


def _copy(built, tmp_path, name="b") -> Path:
    dest = tmp_path / name
    shutil.copytree(built[2], dest, symlinks=True)
    return dest


def _edit_manifest(bundle: Path, change) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


# --- compile -o ----------------------------------------------------------------------------------


@pytest.fixture
def no_compile(monkeypatch):
    """Fails the test if a compile starts: -o must be refused before any work."""
    import graphopt.backends.compile as compile_mod

    def boom(*a, **k):
        raise AssertionError("the compile started before -o was checked")

    monkeypatch.setattr(compile_mod, "compile_model", boom)


def test_compile_keeps_a_directory_it_did_not_write(tmp_path, capsys, no_compile, monkeypatch):
    """The issue's reproduction: a manifest.json of '{}' beside the user's files; nothing is deleted."""
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "p"
    (p / "src").mkdir(parents=True)
    (p / "manifest.json").write_text("{}\n")
    (p / "notes.txt").write_text("keep\n")
    before = _tree(p)
    _refused(*_cli(capsys, "compile", "light:squeezenet", "-o", "p"),
             "-o p: not a bundle graphopt wrote (it holds notes.txt, src/); refusing to replace it")
    assert _tree(p) == before
    (p / "notes.txt").unlink()
    (p / "src").rmdir()
    _refused(*_cli(capsys, "compile", "light:squeezenet", "-o", "p"), "its manifest.json is not one graphopt writes")


def test_compile_replaces_only_a_bundle_it_wrote(built, tmp_path, capsys):
    d, model, _, _, _ = built
    b = _copy(built, tmp_path)
    (b / "README").write_text("mine")  # anything beside the listed files makes it not ours
    _refused(*_cli(capsys, "compile", model, "-o", b, "-O0"), "it holds README")
    (b / "README").unlink()
    (b / "loader.py").unlink()
    (b / "loader.py").mkdir()  # a listed name that is not a regular file
    _refused(*_cli(capsys, "compile", model, "-o", b, "-O0"), "it holds loader.py/")
    (b / "loader.py").rmdir()
    shutil.copyfile(built[2] / "loader.py", b / "loader.py")
    old = json.loads((b / "manifest.json").read_text())
    assert main(["compile", model, "-o", str(b), "-O0", "--json"]) == 0  # a bundle graphopt wrote: replaced
    assert json.loads((b / "manifest.json").read_text())["opt_level"] == 0 != old["opt_level"]
    printed = json.loads(capsys.readouterr().out)["digest"]
    assert printed == "sha256:" + hashlib.sha256((b / "manifest.json").read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary directories left


def test_compile_refuses_the_current_directory_and_its_parents(tmp_path, capsys, no_compile, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "model.onnx").write_bytes(b"x")
    monkeypatch.chdir(work)
    for out in (".", "..", str(tmp_path), "./"):
        _refused(*_cli(capsys, "compile", "model.onnx", "-o", out), "is the current directory or one of its parents")
    assert (work / "model.onnx").read_bytes() == b"x"


def test_compile_refuses_an_unwritable_parent(tmp_path, capsys, no_compile):
    if os.geteuid() == 0:  # root writes through permission bits; /proc/sys refuses new entries even to root
        parent = Path("/proc/sys")
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
    _refused(*_cli(capsys, "compile", "light:squeezenet", "-o", parent / "bundle"),
             f"directory {parent} is not writable")
    (tmp_path / "f").write_text("x")
    _refused(*_cli(capsys, "compile", "light:squeezenet", "-o", tmp_path / "f" / "b"), f"{tmp_path / 'f'} is not a directory")
    _refused(*_cli(capsys, "compile", "light:squeezenet", "-o", tmp_path / "f"), "exists and is not a directory")
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    _refused(*_cli(capsys, "compile", "light:squeezenet", "-o", link), "is a symbolic link")


# --- the digest ----------------------------------------------------------------------------------


def test_digest_is_the_manifest_hash_and_pins_the_bundle(built, tmp_path, capsys):
    d, model, bundle, digest, x = built
    out = tmp_path / "o.npz"
    assert main(["run", str(bundle), "--inputs", str(d / "in.npz"), "-o", str(out), "--expect-digest", digest]) == 0
    with np.load(out) as data:
        np.testing.assert_allclose(data["y"], ort_run(model, {"x": x})[0], rtol=RTOL, atol=ATOL)
    b = _copy(built, tmp_path)
    (b / "manifest.json").write_text((b / "manifest.json").read_text() + " ")  # same content, other bytes
    for argv in (["run", b, "--inputs", d / "in.npz", "-o", tmp_path / "o2.npz"], ["bench", b, "--against", "none"],
                 ["serve", b, "--port", "0"]):
        _refused(*_cli(capsys, *argv, "--expect-digest", digest), "differs from the expected " + digest)
    _refused(*_cli(capsys, "run", bundle, "--inputs", d / "in.npz", "-o", tmp_path / "o2.npz",
                   "--expect-digest", "sha256:1234"), "is not 'sha256:' followed by 64 hex digits")
    _refused(*_cli(capsys, "serve", bundle, bundle, "--name", "a", "--name", "b", "--expect-digest", digest),
             "--expect-digest given 1 times for 2 bundles")
    assert not (tmp_path / "o2.npz").exists()
    with pytest.raises(loader.BundleError, match="differs from the expected"):
        loader.load(str(b), digest=digest)
    with pytest.raises(BundleError, match="differs from the expected"):
        api.load_bundle(b, digest=digest)
    assert api.load_bundle(bundle, digest=digest.upper().replace("SHA256:", "sha256:"))(x)["y"].shape == (1, 10)


# --- what the loader opens -----------------------------------------------------------------------

def _outside_library(bundle: Path) -> None:
    elsewhere = bundle.parent / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(bundle / "lib.so", elsewhere / "lib.so")
    (bundle / "lib.so").unlink()
    (bundle / "lib.so").symlink_to(elsewhere / "lib.so")  # same bytes, same hash, outside the bundle


TRUST_CASES = {  # the two, then the rest of the trust model
    "files emptied": (lambda b: _edit_manifest(b, lambda m: m.update(files={})), "'files' must be a non-empty table"),
    "library outside": (lambda b: _edit_manifest(b, lambda m: m.update(library="../../elsewhere/lib.so")),
                        "is not listed in 'files'"),
    "library outside, listed": (
        lambda b: _edit_manifest(b, lambda m: (m.update(library="../elsewhere/lib.so"),
                                               m["files"].update({"../elsewhere/lib.so": m["files"]["lib.so"]}))),
        "not a plain file name inside the bundle"),
    "absolute library": (lambda b: _edit_manifest(b, lambda m: (m.update(library="/etc/passwd"), m["files"].update(
        {"/etc/passwd": "0" * 64}))), "not a plain file name inside the bundle"),
    "library not listed": (lambda b: _edit_manifest(b, lambda m: m["files"].pop("lib.so")), "lib.so is not listed"),
    "symlink leaving": (_outside_library, "lib.so is a symbolic link leading out of the bundle"),
    "params not listed": (lambda b: _edit_manifest(b, lambda m: m["params"].update(file="params.npz", keys=["p0"])),
                          "params.npz is not listed"),
}


@pytest.mark.parametrize("case", list(TRUST_CASES))
def test_loader_opens_only_listed_files_inside_the_bundle(built, tmp_path, capsys, case):
    change, message = TRUST_CASES[case]
    b = _copy(built, tmp_path / "w")
    change(b)
    for verify in ([], ["--no-verify"]):  # --no-verify skips hashing, never these checks
        _refused(*_cli(capsys, "run", b, "--inputs", built[0] / "in.npz", "-o", tmp_path / "o.npz", *verify), message)
    assert not (tmp_path / "o.npz").exists()


def test_no_verify_with_a_damaged_library_or_params_is_one_line(built, tmp_path, capsys):
    d, model, _, _, x = built
    from graphopt.backends.compile import compile_model

    b = compile_model(api.load(model), opt_level=1, embed_params=False, source_path=model).save(tmp_path / "p")
    run = ["run", b, "--inputs", d / "in.npz", "-o", tmp_path / "o.npz", "--no-verify"]
    lib, params = (b / "lib.so").read_bytes(), (b / "params.npz").read_bytes()
    (b / "params.npz").write_bytes(params[: len(params) // 2])
    _refused(*_cli(capsys, *run), "params.npz: params file unreadable")
    (b / "params.npz").write_bytes(params)
    _edit_manifest(b, lambda m: m["params"].update(keys=["p0", "p9"]))
    _refused(*_cli(capsys, *run), "lacks the array 'p9'")
    for damaged, message in ((lib[: len(lib) // 3], "truncated or corrupted ELF library"),
                             (b"\0" * 4096, "not an ELF shared library")):
        # A new file, as a copy or download would make: the runs above loaded lib.so into this process,
        # and truncating a loaded library in place makes the process fault (SIGBUS) when it unloads it.
        (b / "lib.so").unlink()
        (b / "lib.so").write_bytes(damaged)
        _refused(*_cli(capsys, *run), f"{b / 'lib.so'}: ", message)
    assert not (tmp_path / "o.npz").exists()


def test_manifest_that_does_not_describe_the_library(built, tmp_path, capsys):
    d = built[0]
    b = _copy(built, tmp_path / "w")
    run = ["run", b, "--inputs", d / "in.npz", "-o", tmp_path / "o.npz", "--no-verify"]
    _edit_manifest(b, lambda m: m["outputs"].append({"name": "extra", "shape": [1], "dtype": "float32"}))
    _refused(*_cli(capsys, *run), "the library returned 1 outputs, the manifest lists 2")
    _edit_manifest(b, lambda m: (m["outputs"].pop(), m["inputs"][0].update(shape=[1, 3, 200, 224])))
    np.savez(d / "in200.npz", x=np.zeros((1, 3, 200, 224), np.float32))
    _refused(*_cli(capsys, *run[:2], "--inputs", d / "in200.npz", *run[4:]), "the manifest does not describe this library")


# --- the fuzz: malformed manifests and bundle directories from a seed ----------------------------

BAD_VALUES = {  # field path in the manifest -> values the loader must refuse there
    ("format",): ["graphopt-bundl", None, 1, [], {}],
    ("format_version",): ["1", 1.5, True, None, 99, []],
    ("library",): [None, 3, [], "../lib.so", "/etc/passwd", "sub/lib.so", "", ".", "..", "missing.so", "loader.py"],
    ("files",): [{}, [], None, "lib.so", {"lib.so": "00"}],
    ("files", "lib.so"): ["ABC", None, 5, "G" * 64, "0" * 63],
    ("params",): [None, [], "params.npz", 3],
    ("params", "file"): [3, [], "params.npz", "../params.npz", "lib.so"],
    ("inputs",): [None, {}, "x", [[1]], [{"name": "x"}], []],
    ("inputs", 0, "name"): [None, 5, "y"],
    ("inputs", 0, "shape"): [None, "1,3", [1, 3, -1, 224], [1, 3, 224], [1.5], [1, 3, 200, 224]],
    ("inputs", 0, "dtype"): [None, "float", "f4", 32, "float64", "(("],
    ("outputs",): [None, [], {}, "y"],
    ("outputs", 0, "name"): [None, 7, []],
    ("outputs", 0, "shape"): ["y", [-1], [1.5]],
    ("outputs", 0, "dtype"): ["nope", None],
    ("target",): [[], "x86", 1],
    ("target", "target"): [[], "llvm", 3, {"kind": 3}, {"mattr": "x"}, {"mtriple": "riscv64-unknown-linux-gnu"}],
}


def _set(m, path, value) -> None:
    try:
        for key in path[:-1]:
            m = m[key]
        m[path[-1]] = value
    except (KeyError, IndexError, TypeError):  # an earlier change removed the field's parent
        pass


def _text_case(rng: random.Random, text: str) -> bytes:
    kind = rng.randrange(7)
    if kind == 0:  # not UTF-8
        i = rng.randrange(len(text))
        return text[:i].encode() + b"\xff\xfe" + text[i:].encode()
    if kind == 1:  # truncated JSON
        return text[: rng.randrange(len(text.rstrip()))].encode()
    if kind == 2:  # a list, a string, a number, null
        return json.dumps(rng.choice([[json.loads(text)], "manifest", 1, None])).encode()
    if kind == 3:
        return b"\xef\xbb\xbf" + text.encode()  # a byte-order mark
    if kind == 4:
        return b"[" * 100000 + b"]" * 100000
    m = json.loads(text)
    for _ in range(1 + kind - 5):  # one or two fields with a wrong value
        path = rng.choice(sorted(BAD_VALUES, key=str))
        _set(m, path, rng.choice(BAD_VALUES[path]))
    return json.dumps(m).encode()


def _dir_case(rng: random.Random, b: Path) -> list[str]:
    kind = rng.randrange(6)
    lib = b / "lib.so"
    if kind == 0:
        lib.unlink()
    elif kind == 1:
        lib.unlink()
        lib.mkdir()
    elif kind == 2:
        _outside_library(b)
    elif kind == 3:  # truncated anywhere: the ELF size check must catch it before the dynamic loader
        data = lib.read_bytes()
        lib.write_bytes(data[: rng.randrange(len(data))])
        return ["--no-verify"]
    elif kind == 4:
        (b / "manifest.json").unlink()
        (b / "manifest.json").mkdir()
    else:
        (b / "manifest.json").unlink()
    return []


def test_fuzz_malformed_bundles_exit_2_with_one_line(built, tmp_path, capsys):
    d = built[0]
    rng = random.Random(25)
    text = (built[2] / "manifest.json").read_text()
    inputs = (d / "in.npz").read_bytes()
    for i in range(100):
        case = tmp_path / f"c{i}"
        b = _copy(built, case)
        extra = []
        if i % 4 == 3:
            extra = _dir_case(rng, b)
        else:
            (b / "manifest.json").write_bytes(_text_case(rng, text))
            extra = rng.choice([[], ["--no-verify"]])
        before = _tree(case)
        code, err = _cli(capsys, "run", b, "--inputs", d / "in.npz", "-o", case / "o.npz", *extra)
        _refused(code, err, "graphopt run: error: ")
        assert _tree(case) == before, f"case {i} changed or left files"
        shutil.rmtree(case)
    assert (d / "in.npz").read_bytes() == inputs


def test_fuzz_compile_destinations_are_kept(built, tmp_path, capsys, no_compile):
    """Directories that are not bundles graphopt wrote, from a seed: refused, byte-identical."""
    rng = random.Random(19)
    valid = json.loads((built[2] / "manifest.json").read_text())
    for i in range(30):
        p = tmp_path / f"d{i}"
        p.mkdir()
        manifest = rng.choice([valid, {}, [], {"format": "graphopt-bundle"}, {**valid, "files": "x"}])
        (p / "manifest.json").write_text(json.dumps(manifest))
        for name in rng.sample(["notes.txt", "lib.so", "loader.py", "src", ".hidden", "params.npz"], rng.randrange(1, 4)):
            if name == "src":
                (p / name).mkdir()
            else:
                (p / name).write_text(name)
        if manifest is valid and all(n in valid["files"] for n in os.listdir(p) if n != "manifest.json") \
                and not (p / "src").exists():
            (p / "notes.txt").write_text("mine")  # otherwise it would be a bundle graphopt wrote
        before = _tree(tmp_path)
        _refused(*_cli(capsys, "compile", built[1], "-o", p), "not a bundle graphopt wrote", "refusing to replace it")
        assert _tree(tmp_path) == before


STANDALONE = {  # case -> (change, extra arguments, message): refusals of the standalone loader
    "not utf-8": (lambda b: (b / "manifest.json").write_bytes(b"\xff{}"), [], "not UTF-8 text"),
    "a list": (lambda b: (b / "manifest.json").write_text("[]"), [], "a JSON list, not an object"),
    "lacks inputs": (lambda b: _edit_manifest(b, lambda m: m.pop("inputs")), [], "lacks the field 'inputs'"),
    "more outputs": (lambda b: _edit_manifest(b, lambda m: m["outputs"].append(dict(m["outputs"][0], name="z"))),
                     [], "the library returned 1 outputs, the manifest lists 2"),
    "digest": (lambda b: None, ["--expect-digest", "sha256:" + "a" * 64], "differs from the expected"),
    "truncated library": (lambda b: (b / "lib.so").write_bytes((b / "lib.so").read_bytes()[:5000]), ["--no-verify"],
                          "truncated or corrupted ELF library"),
}

_DRIVER = """
import contextlib, importlib.util, io, json, sys
spec = importlib.util.spec_from_file_location("loader", sys.argv[1])
loader = importlib.util.module_from_spec(spec); spec.loader.exec_module(loader)
results = {}
for name, argv in json.loads(sys.argv[2]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        results[name] = (loader.main(argv), err.getvalue())
print(json.dumps(results))
"""


def test_standalone_loader_gives_the_same_refusals(built, tmp_path):
    """Every case through the copied loader's main() in one fresh process (no graphopt imported), and
    the last one as ``python BUNDLE/loader.py`` itself, for its exit code."""
    d = built[0]
    argvs = {}
    for name, (change, extra, _) in STANDALONE.items():
        b = _copy(built, tmp_path / name.replace(" ", "_"))
        change(b)
        argvs[name] = [str(b), "--inputs", str(d / "in.npz"), "-o", str(b.parent / "o.npz"), *extra]
    own = subprocess.Popen([sys.executable, str(b / "loader.py"), *argvs[name]], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    r = subprocess.run([sys.executable, "-c", _DRIVER, str(built[2] / "loader.py"), json.dumps(argvs)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    _, own_err = own.communicate(timeout=300)
    results = {**json.loads(r.stdout), "process": (own.returncode, own_err)}
    for case, (code, err) in results.items():
        _refused(code, err, "loader: error: ", STANDALONE[name if case == "process" else case][2])
    assert not list(tmp_path.glob("*/o.npz"))


# --- threads ---------------------------------------------------------------------------------------


def _proc_status() -> tuple[int, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) / 1024


def test_calls_from_fresh_threads_keep_threads_and_memory_bounded(built):
    _, model, bundle, _, x = built
    module = api.load_bundle(bundle)
    expected = module(x)["y"]
    assert not hasattr(module.runner._calls, "_thread")  # the loading thread's calls run on it, no hand-off
    threads0, rss0 = _proc_status()
    results = []
    for _ in range(200):
        t = threading.Thread(target=lambda: results.append(module(x)["y"]))
        t.start()
        t.join()
    threads1, rss1 = _proc_status()
    assert len(results) == 200 and all(np.array_equal(r, expected) for r in results)
    assert threads1 - threads0 <= 4, (threads0, threads1)  # the runner's thread, its TVM pool, one exiting: was +400
    assert rss1 - rss0 < 60, (rss0, rss1)  # was about +0.6 MB a call
    # concurrent callers each get the answer for their own input
    xs = [x * (i + 1) for i in range(6)]
    want = [module(v)["y"] for v in xs]
    got = [None] * 6
    workers = [threading.Thread(target=lambda i=i: got.__setitem__(i, module(xs[i])["y"])) for i in range(6)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    np.testing.assert_allclose(expected, ort_run(model, {"x": x})[0], rtol=RTOL, atol=ATOL)
    # the runner's thread ends with the runner
    calls = module.runner._calls._thread
    assert calls.is_alive()
    del module
    gc.collect()
    calls.join(timeout=10)
    assert not calls.is_alive()
