"""The error contract of every command, table-driven: each bad input ends with exactly one
stderr line starting with `error:` that names the problem, exit code 2, and no file changed.

The commands' `main(argv)` run in this process (fast); `python -m rkd_jax.main` runs in a
subprocess, since absl parses its flags once per process. Valid data that a flag tells the
reader to skip, --overwrite, and the data and checkpoint contracts behind the messages are
tested here too."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, load_config
from test_data_refer import _Hostile, write_tiny_root

from rkd_jax import cli, config_check, report, table
from rkd_jax.data import prepare, refer, synthetic

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def snapshot(*roots: Path) -> dict:
    """Every file and directory under `roots`: (size, mtime) of files, None for directories."""
    out = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            out[str(root)] = "absent"
            continue
        for p in [root, *root.rglob("*")]:
            out[str(p)] = None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
    return out


def refuses(main, argv, capsys, watch=(), contains="") -> str:
    """Run `main(argv)`; assert exit code 2, one `error:` line on stderr containing
    `contains`, and nothing under `watch` created, changed or removed. Returns the line."""
    capsys.readouterr()
    before = snapshot(*watch)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err[-2000:])
    assert contains in lines[0], (argv, lines[0])
    assert snapshot(*watch) == before, argv
    return lines[0]


def test_cli_run_keeps_programming_errors_as_tracebacks(capsys):
    def broken(argv):
        return {}["missing"]

    with pytest.raises(KeyError):
        cli.run(broken, [])
    assert refuses(lambda a: cli.run(lambda _: int("x"), a), [], capsys).startswith(
        "error: invalid literal"
    )
    assert cli.run(lambda _: None, []) == 0


def _edit_instances(root, edit):
    path = Path(root) / "refcoco" / "instances.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))  # NaN and Infinity are written as the JSON extension


def _edit_refs(root, edit):
    path = Path(root) / "refcoco" / "refs(unc).p"
    refs = pickle.loads(path.read_bytes())
    out = edit(refs)
    refs = out if isinstance(out, dict) else refs  # an edit that replaces the list returns it
    path.write_bytes(pickle.dumps(refs, protocol=2))


def _ann(data, ann_id):
    return next(a for a in data["annotations"] if a["id"] == ann_id)


def _set_seg(ann_id, seg):
    return lambda d: _ann(d, ann_id).update(segmentation=seg)


def _set_coord(ann_id, index, value):
    return lambda d: _ann(d, ann_id)["segmentation"][0].__setitem__(index, value)


def _ref(refs, ref_id):
    return next(r for r in refs if r["ref_id"] == ref_id)


def _del_key(records, key):
    return lambda d: d[records][1].pop(key)


INSTANCE_CASES = [
    # (id, edit of instances.json, words of the message)
    ("nan", _set_coord(11, 1, float("nan")), "annotation 11 of"),
    ("nan-named", _set_coord(11, 1, float("nan")), "polygon part 0 has coordinate 1 = nan"),
    ("inf", _set_coord(22, 2, float("inf")), "coordinate 2 = inf"),
    ("huge", _set_coord(11, 0, 1e30), "x = 1e+30 outside the image's 0..30"),
    ("outside", _set_seg(22, [[100, 100, 110, 100, 110, 110]]), "outside the image"),
    ("two-points", _set_seg(22, [[4, 4, 10, 4]]), "no polygon part has 3 or more points"),
    ("no-polygon", _set_seg(22, []), "segmentation has no polygon"),
    ("odd", _set_seg(22, [[4, 4, 10, 4, 10]]), "odd number of coordinates"),
    ("empty-mask", _set_seg(12, {"size": [20, 30], "counts": [600]}), "mask is empty"),
    ("rle-sum", _set_seg(12, {"size": [20, 30], "counts": [5, 5]}), "RLE counts sum to 10"),
    ("rle-size", _set_seg(12, {"size": [10, 30], "counts": [300]}), "RLE size [10, 30] differs"),
    ("rle-string", _set_seg(12, {"size": [20, 30], "counts": "!!!"}), "not COCO's compressed RLE"),
    ("no-segmentation", lambda d: _ann(d, 13).pop("segmentation"), "has no 'segmentation'"),
    ("no-bbox", lambda d: _ann(d, 13).pop("bbox"), "bbox None is not 4 finite numbers"),
    ("no-file-name", lambda d: d["images"][1].pop("file_name"), "image 2 of"),
    ("zero-height", lambda d: d["images"][1].update(height=0), "height 0, expected a positive"),
    ("no-ann-id", _del_key("annotations", "id"), "annotations[1] has no 'id'"),
    ("no-category-name", _del_key("categories", "name"), "categories[1] has no 'name'"),
]

REF_CASES = [
    ("unknown-split", lambda r: _ref(r, 1).update(split="bogus"), "split 'bogus' is not one of"),
    ("no-sentences", lambda r: _ref(r, 2).update(sentences=[]), "ref 2: has no sentences"),
    ("no-sent", lambda r: _ref(r, 3)["sentences"][0].pop("sent"), "sentence #0 has no 'sent'"),
    ("unknown-ann", lambda r: _ref(r, 3).update(ann_id=999), "names ann_id 999"),
    ("not-a-ref", lambda r: r.append("junk"), "ref #5 is not a dict"),
    ("not-a-list", lambda r: {"refs": r}, "expected a list of refs, got dict"),
]


def _bad_root(tmp_path, case, edit, kind):
    root = write_tiny_root(tmp_path / case)
    (_edit_instances if kind == "instances" else _edit_refs)(root, edit)
    return Path(root)


@pytest.mark.parametrize(
    "case,edit,words,kind",
    [(*c, "instances") for c in INSTANCE_CASES] + [(*c, "refs") for c in REF_CASES],
    ids=[c[0] for c in INSTANCE_CASES + REF_CASES],
)
def test_refer_refuses_bad_annotations(tmp_path, capsys, case, edit, words, kind):
    root = _bad_root(tmp_path, case, edit, kind)
    line = refuses(refer.main, ["--root", str(root)], capsys, [root], words)
    # The file is named, and for a bad ref the ref and how to skip such refs instead.
    assert f"{root}/refcoco/" in line
    if kind == "refs" and case not in ("not-a-ref", "not-a-list") or case == "nan":
        assert "--skip-invalid-annotations" in line


def test_refer_command_line_mistakes(tmp_path, capsys):
    tiny = Path(write_tiny_root(tmp_path / "ok"))
    marker = tmp_path / "pwned"
    hostile = Path(write_tiny_root(tmp_path / "hostile"))
    (hostile / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([_Hostile(marker)]))
    (tmp_path / "notjson").mkdir()
    broken = Path(write_tiny_root(tmp_path / "broken"))
    (broken / "refcoco" / "instances.json").write_text("{")
    cases = [
        ([], "the following arguments are required: --root"),
        (["--root", str(tmp_path / "nope")], "REFER root directory does not exist"),
        (["--root", str(tiny), "--dataset", "refcocoX"], "argument --dataset: invalid choice"),
        (
            ["--root", str(tiny), "--split-by", "google"],
            "unknown dataset/split_by 'refcoco/google'",
        ),
        (["--root", str(tiny), "--bogus"], "unrecognized arguments: --bogus"),
        (["--root", str(hostile)], "refuses to load posix.system"),
        (["--root", str(broken)], "instances.json: not readable JSON"),
    ]
    for argv, words in cases:
        refuses(refer.main, argv, capsys, [tmp_path], words)
    assert not marker.exists()


def test_skip_invalid_annotations_leaves_them_out_and_counts_them(tmp_path, capsys):
    root = Path(write_tiny_root(tmp_path / "r"))
    _edit_instances(root, _set_coord(11, 1, float("nan")))  # ref 0, train
    _edit_refs(root, lambda r: _ref(r, 3).update(split="bogus"))
    r = refer.Refer(root, "refcoco", "unc", skip_invalid=True)
    assert dict(r.skipped) == {"non-finite coordinate": 1, "unknown split": 1}
    assert [ref_id for ref_id, _ in r.skipped_refs] == [0, 3]
    assert r.counts("train")["objects"] == 1 and r.counts("testB")["objects"] == 0
    assert refer.main(["--root", str(root), "--skip-invalid-annotations"]) == 0
    out = capsys.readouterr().out
    assert "left out 2 invalid refs: 1 non-finite coordinate, 1 unknown split" in out


def test_bad_segmentations_never_reach_pycocotools():
    for seg in ([[0, 0, float("nan"), 1, 2, 2]], [[0, 0, 1e300, 0, 5, 5]], [[1, 1, 2, 2]]):
        with pytest.raises(ValueError, match="here: "):
            refer.segmentation_to_mask(seg, 10, 10, "here")
    with pytest.raises(ValueError, match="RLE counts sum to 4"):
        refer.segmentation_to_mask({"size": [3, 3], "counts": "4"}, 3, 3, "here")


def test_prepare_refuses_bad_data_before_building(tmp_path, capsys):
    nan_root = _bad_root(tmp_path, "nan", INSTANCE_CASES[0][1], "instances")
    split_root = _bad_root(tmp_path, "split", REF_CASES[0][1], "refs")
    data_dir = tmp_path / "tfds"
    common = ["--data-dir", str(data_dir)]
    watch = [nan_root, split_root, data_dir]
    cases = [
        (["--refer-root", str(nan_root)], "annotation 11 of"),
        (["--refer-root", str(split_root)], "split 'bogus' is not one of"),
        (["--refer-root", str(tmp_path / "nope")], "--refer-root"),
        (["--synthetic-num-images", "0"], "--synthetic-num-images 0: expected at least 1"),
        (["--dataset", "coco"], "argument --dataset: invalid choice"),
        (["--synthetic-seed", "x"], "argument --synthetic-seed: invalid int value"),
    ]
    for argv, words in cases:
        refuses(prepare.main, common + argv, capsys, watch, words)


def test_prepare_skips_invalid_annotations_when_asked(tmp_path, capsys):
    root = _bad_root(tmp_path, "nan", INSTANCE_CASES[0][1], "instances")
    argv = ["--refer-root", str(root), "--data-dir", str(tmp_path / "tfds")]
    assert prepare.main(argv + ["--skip-invalid-annotations"]) == 0
    out = capsys.readouterr().out
    assert "left out invalid refs: 1 non-finite coordinate" in out
    # train has 2 objects, one of them the NaN polygon's ref
    assert [line.split() for line in out.splitlines() if line.split()[:1] == ["train"]] == [
        ["train", "1", "examples"]
    ]


def test_synthetic_never_overwrites_without_overwrite(tmp_path, capsys):
    existing = Path(write_tiny_root(tmp_path / "refer"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["--out", str(existing)], "already holds images, refcoco; its instances.json"),
        (["--out", str(a_file)], "is a file; expected a directory"),
        (["--out", str(tmp_path / "n"), "--num-images", "0"], "--num-images 0: expected a pos"),
        (["--out", str(tmp_path / "n"), "--workers", "0"], "--workers 0: expected a positive"),
        (["--out", str(tmp_path / "n"), "--sentences-per-object", "-1"], "expected a positive"),
        (["--out", str(tmp_path / "n"), "--num-images", "many"], "invalid int value: 'many'"),
        ([], "the following arguments are required: --out"),
    ]
    for argv, words in cases:
        refuses(synthetic.main, argv, capsys, [tmp_path], words)
    assert not (tmp_path / "n").exists()
    # Asked to: the generated files replace the old ones.
    assert synthetic.main(["--out", str(existing), "--num-images", "5", "--overwrite"]) == 0
    assert refer.Refer(existing, "refcoco", "unc").counts("train")["images"] > 0


def test_report_and_table_bad_input(tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    no_get_config = tmp_path / "cfg.py"
    no_get_config.write_text("x = 1\n")
    for argv, words in [
        (["--config", str(tmp_path / "none.py")], "none.py: not found"),
        (["--config", "configs/distill.py:bogus"], "unknown config variant 'bogus'"),
        (["--config", str(no_get_config)], "defines no get_config"),
        (["--config", str(a_file)], "not a Python file"),
        (["--params", "--json", str(tmp_path / "adir")], "--json"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ]:
        refuses(report.main, argv, capsys, [tmp_path], words)
    out = str(tmp_path / "out")
    for argv, words in [
        (["--root", str(tmp_path / "nope"), "--out", out], "nope"),
        (["--root", str(tmp_path), "--out", out, "--seeds", "0"], "--seeds 0: expected a posit"),
        (["--root", str(tmp_path), "--seeds", "x"], "argument --seeds: invalid int value"),
        (["--root", str(a_file), "--out", out], "file"),
    ]:
        refuses(table.main, argv, capsys, [tmp_path], words)


def _config(**changes):
    c = load_config("distill", "tiny")
    for path, value in changes.items():
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


CONFIG_CASES = [
    ({"mode": "distil"}, "config.mode='distil': expected one of teacher, student, distill"),
    ({"train.epochs": 0}, "config.train.epochs=0: expected an integer >= 1"),
    ({"teacher_train.epochs": -1}, "config.teacher_train.epochs=-1"),
    ({"train.batch_size": 0}, "config.train.batch_size=0: expected an integer >= 1"),
    ({"run.checkpoint_every_steps": 0}, "config.run.checkpoint_every_steps=0"),
    ({"run.log_every_steps": 0}, "config.run.log_every_steps=0"),
    ({"run.eval_every_epochs": 0}, "config.run.eval_every_epochs=0: expected a finite number > 0"),
    ({"run.eval_batch_size": 0}, "config.run.eval_batch_size=0"),
    ({"run.keep_checkpoints": 0}, "config.run.keep_checkpoints=0"),
    ({"run.threshold": 1.5}, "config.run.threshold=1.5"),
    ({"run.compute_dtype": "float16"}, "config.run.compute_dtype='float16'"),
    ({"data.image_size": 0}, "config.data.image_size=0: expected an integer >= 32"),
    ({"data.image_size": 16}, "the backbone's stride is 32"),
    ({"data.max_tokens": 2}, "config.data.max_tokens=2: expected an integer >= 3"),
    ({"data.eval_splits": ("val", "test")}, "'test' is not a split of refcoco/unc"),
    ({"data.eval_splits": ()}, "config.data.eval_splits=(): expected a non-empty list"),
    ({"data.val_split": "dev"}, "config.data.val_split='dev'"),
    ({"data.dataset": "refcocog"}, "unknown dataset/split_by 'refcocog/unc'"),
    ({"data.root": "/no/such/refer"}, "config.data.root='/no/such/refer': no such directory"),
    ({"data.synthetic_num_images": 0}, "config.data.synthetic_num_images=0"),
    ({"student.backbone": "resnet7"}, "config.student.backbone='resnet7': expected one of"),
    ({"teacher.backbone": "vgg"}, "config.teacher.backbone='vgg'"),
    ({"student.attention_norm": "sigmoid"}, "config.student.attention_norm='sigmoid'"),
    ({"teacher.fusion_mode": "concat"}, "config.teacher.fusion_mode='concat': expected one of"),
    ({"student.fpn_dim": 8}, "config.student.fpn_dim=8 differs from config.teacher.fpn_dim=16"),
    ({"student.text_encoder_dir": "/no/bert"}, "config.student.text_encoder_dir='/no/bert'"),
    ({"student.backbone_weights": "/no/r18.pth"}, "config.student.backbone_weights"),
    ({"distill.method": "kd"}, "config.distill.method='kd': expected one of"),
    ({"distill.lambda_vl": -0.5}, "config.distill.lambda_vl=-0.5"),
    ({"distill.kd_temperature": 0.0}, "config.distill.kd_temperature=0.0"),
    ({"train.lr": float("nan")}, "config.train.lr=nan: expected a finite number > 0"),
    ({"train.lr": 0.0}, "config.train.lr=0.0"),
    ({"train.lr_decay_epochs": (-1,)}, "config.train.lr_decay_epochs=(-1,)"),
    ({"teacher_checkpoint": "/no/teacher"}, "/no/teacher: no such checkpoint"),
]


@pytest.mark.parametrize("changes,words", CONFIG_CASES, ids=[str(c) for c, _ in CONFIG_CASES])
def test_config_is_validated_before_any_work(changes, words):
    with pytest.raises(ValueError) as e:
        config_check.validate_config(_config(**changes))
    assert words in str(e.value)


def test_config_check_passes_every_variant_and_names_missing_fields():
    for variant in ("", "tiny", "lite0"):
        config_check.validate_config(load_config("distill", variant))
    c = _config()
    del c.run["threshold"]
    with pytest.raises(cli.UserError, match=r"config.run.threshold is missing"):
        config_check.validate_config(c)
    # A field the chosen mode does not use is not checked: a student run ignores the teacher.
    config_check.validate_config(_config(mode="student", **{"teacher.backbone": "vgg"}))


def test_teacher_checkpoint_must_hold_a_teacher(tiny_run):
    config_check.validate_config(_config(teacher_checkpoint=str(tiny_run / "teacher")))
    with pytest.raises(ValueError, match=r"holds the student model .*expected the teacher"):
        config_check.validate_config(_config(teacher_checkpoint=str(tiny_run)))


def _main_command(*args, env_extra=None):
    env = dict(os.environ, RKD_JAX_KEEP_MALLOC="1", JAX_PLATFORMS="cpu", **(env_extra or {}))
    cmd = [sys.executable, "-m", "rkd_jax.main", *args]
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def test_main_bad_flags_and_config_one_line(tmp_path):
    workdir = tmp_path / "run"
    marker = tmp_path / "pwned"
    hostile = Path(write_tiny_root(tmp_path / "hostile"))
    (hostile / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([_Hostile(marker)]))
    tiny = "--config=configs/distill.py:tiny"
    cases = [
        ([tiny, "--config.foo=1"], "error: --config.foo: the configuration has no field 'foo'"),
        (["--config=configs/distill.py:bogus"], "unknown config variant 'bogus'"),
        ([tiny, "--mode=fit"], "error: flag --mode=fit: value should be one of"),
        ([tiny, "--config.train.batch_size=0"], "config.train.batch_size=0: expected an integer"),
        ([tiny, "--config.data.image_size=0"], "config.data.image_size=0"),
        ([tiny, f"--config.data.root={hostile}"], "refuses to load posix.system"),
    ]
    for args, words in cases:
        res = _main_command(*args, f"--workdir={workdir}")
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        error_lines = [x for x in lines if x.startswith("error:")]
        assert res.returncode == 2, (args, res.stderr[-3000:])
        # The data preparation of the hostile case logs its progress before the refusal.
        assert len(error_lines) == 1 and words in error_lines[0], (args, res.stderr[-3000:])
        assert "Traceback" not in res.stderr, args
        if "root=" not in args[-1]:
            assert lines == error_lines, (args, res.stderr[-3000:])
            assert not workdir.exists(), args  # refused before any work
    assert not marker.exists()


def test_main_refuses_a_run_directory_in_use(tmp_path):
    from test_checkpoint_safety import HOLDER

    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        res = _main_command("--config=configs/distill.py:tiny", f"--workdir={tmp_path}")
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert errors == [
        f"error: {tmp_path}: in use by pid {holder.pid} on {os.uname().nodename} since "
        + errors[0].split(" since ")[-1]
    ]
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # nothing else written


def _only_incomplete(tmp_path) -> Path:
    run = tmp_path / "interrupted"
    (run / "checkpoints" / "7").mkdir(parents=True)
    return run


def test_export_bad_input_and_no_overwrite(tiny_run, tmp_path, capsys):
    from rkd_jax import export

    out = tmp_path / "student.jax"
    out.write_bytes(b"previous")
    other = tmp_path / "other"
    other.mkdir()
    (other / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    run, x = str(tiny_run), str(tmp_path / "x.jax")
    cases = [
        (["--checkpoint", run, "--format", "jax", "--out", str(out)], "already exist(s); pass"),
        (["--format", "jax", "--checkpoint", run, "--out", str(other / "s.jax")], "vocabulary"),
        (["--checkpoint", str(tiny_run / "teacher"), "--out", x], "holds the teacher model"),
        (["--checkpoint", run, "--format", "jax", "--quantize", "int8", "--out", x], "needs --for"),
        (["--checkpoint", run, "--format", "tflite", "--out", x], "argument --format: invalid"),
        (["--checkpoint", str(tmp_path / "nope"), "--out", x], "nope: no such checkpoint"),
        (["--checkpoint", run, "--out", str(tmp_path)], "is a directory; expected a file"),
        (["--checkpoint", str(_only_incomplete(tmp_path)), "--out", x], "no complete checkpoint"),
        (["--checkpoint", run, "--format", "jax", "--batch", "0", "--out", x], "--batch 0"),
        (["--checkpoint", run], "the following arguments are required: --out"),
    ]
    for argv, words in cases:
        refuses(export.main, argv, capsys, [tmp_path], words)


def test_export_replaces_only_after_the_parity_check(tiny_run, tmp_path, capsys, monkeypatch):
    from rkd_jax import export
    from rkd_jax.export import sidecar

    out = tmp_path / "student.jax"
    out.write_bytes(b"previous")
    argv = ["--checkpoint", str(tiny_run), "--format", "jax", "--out", str(out), "--overwrite"]
    with monkeypatch.context() as m:
        m.setattr(sidecar, "PARITY_MAX_PROB_DIFF", -1.0)  # no artifact can pass
        refuses(export.main, argv, capsys, [tmp_path], "fails the parity check")
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.jax"]  # no temporary left
    assert export.main(argv) == 0
    assert out.read_bytes() != b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "student.jax",
        "student.jax.json",
        "vocab.txt",
    ]


@pytest.fixture
def cached_models(monkeypatch):
    from test_predictor import cached_predictor

    from rkd_jax.inference import predictor as predictor_lib

    monkeypatch.setattr(
        predictor_lib, "load", lambda path, **kwargs: cached_predictor(str(Path(path)))
    )


def test_demo_and_visualize_bad_input(tiny_run, tmp_path, capsys, cached_models):
    from PIL import Image

    from rkd_jax import demo, visualize

    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    (tmp_path / "adir").mkdir()
    run, teacher = str(tiny_run), str(tiny_run / "teacher")
    common = ["--image", str(image), "--text", "the red one"]
    for argv, words in [
        (["--checkpoint", run, "--out", str(tmp_path / "adir")], "is a directory; expected a PNG"),
        (["--checkpoint", run, "--size", "8"], "--size=8: expected at least 16 pixels"),
        (["--checkpoint", str(_only_incomplete(tmp_path))], "no complete checkpoint"),
        (["--checkpoint", run, "--size", "big"], "argument --size: invalid int value"),
    ]:
        refuses(demo.main, common + argv, capsys, [tmp_path], words)
    out_dir = ["--out-dir", str(tmp_path / "pictures")]
    for argv, words in [
        (["--teacher", run, "--student", teacher], f"--teacher {tiny_run}/checkpoints/"),
        (["--teacher", run, "--student", teacher], "holds the student model"),
        (["--teacher", teacher, "--student", teacher], "--student "),
        (["--teacher", teacher, "--student", run, "--student-before", teacher], "--student-bef"),
        (["--teacher", teacher, "--student", run, "--cell", "4"], "--cell=4: expected at least"),
    ]:
        refuses(visualize.main, common + out_dir + argv, capsys, [tmp_path], words)


def test_demo_draws_a_one_pixel_high_photo_at_exactly_out(
    tiny_run, tmp_path, capsys, cached_models
):
    from PIL import Image

    from rkd_jax import demo

    image = tmp_path / "strip.png"
    Image.new("RGB", (64, 1), (30, 200, 30)).save(image)
    out = tmp_path / "overlay"  # no suffix: the file is still written under this very name
    argv = ["--checkpoint", str(tiny_run), "--image", str(image), "--text", "the green strip"]
    assert demo.main(argv + ["--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay", "strip.png"]
    with Image.open(out) as im:
        assert im.format == "PNG"
    assert f"wrote {out} " in capsys.readouterr().out
