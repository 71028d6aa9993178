"""kdrun's Optuna sweeper without training: the search-space parser, samplers and pruners,
resume accounting, the metric mapping, the sweep lock, plugin discovery staying light, and two
processes sharing one journal file."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys

import pytest

optuna = pytest.importorskip("optuna")
from optuna.distributions import (  # noqa: E402
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState  # noqa: E402

from hydra_plugins.kdrun_optuna_sweeper._search import sweep_lock  # noqa: E402
from hydra_plugins.kdrun_optuna_sweeper._space import parse_search_space  # noqa: E402
from kdrun import hpo  # noqa: E402
from kdrun.errors import ConfigError  # noqa: E402


def test_search_space_syntax_of_the_optuna_sweeper():
    params = {
        "method.alpha_T": "interval(0.1, 0.95)",
        "optim.lr": "tag(log, interval(0.005, 0.2))",
        "trainer.batch_size": "choice(32, 64, 128)",
        "model": "choice(small_cnn, resnet8)",
        "method.tau": "range(1, 9, 2)",
        "method.gamma": "range(0.1, 0.5, 0.1)",
        "trainer.epochs": "int(interval(2, 8))",
        "method.beta": "tag(log, int(interval(1, 64)))",
        "optim.weight_decay": 0.0005,
    }
    dists, fixed = parse_search_space(params, ["seed=3", "trainer.batch_size=16"])
    assert dists == {
        "method.alpha_T": FloatDistribution(0.1, 0.95),
        "optim.lr": FloatDistribution(0.005, 0.2, log=True),
        "model": CategoricalDistribution(["small_cnn", "resnet8"]),
        "method.tau": IntDistribution(1, 9, step=2),
        "method.gamma": FloatDistribution(0.1, 0.5, step=0.1),
        "trainer.epochs": IntDistribution(2, 8),
        "method.beta": IntDistribution(1, 64, log=True),
    }
    # plain values are fixed; the command line fixes a searched key
    assert fixed == {
        "optim.weight_decay": "optim.weight_decay=0.0005",
        "seed": "seed=3",
        "trainer.batch_size": "trainer.batch_size=16",
    }
    # a sweep on the command line joins (or replaces) the space
    dists, _ = parse_search_space(params, ["optim.lr=interval(0.01, 0.02)", "seed=choice(0,1)"])
    assert dists["optim.lr"] == FloatDistribution(0.01, 0.02)
    assert dists["seed"] == CategoricalDistribution([0, 1])
    # `~key` takes a searched key out of the space (and is not passed on); other keys keep it
    dists, fixed = parse_search_space(params, ["~method.beta", "~optim.nesterov"])
    assert "method.beta" not in dists and "method.alpha_T" in dists
    assert "~method.beta" not in fixed and "~optim.nesterov" in fixed


def test_samplers_and_pruners_by_name():
    assert isinstance(
        hpo.make_sampler("tpe", {"n_startup_trials": 3}, 0), optuna.samplers.TPESampler
    )
    # options the chosen sampler does not take are left out
    assert isinstance(
        hpo.make_sampler("random", {"n_startup_trials": 3}, 0), optuna.samplers.RandomSampler
    )
    assert isinstance(hpo.make_sampler("qmc", {}, None), optuna.samplers.QMCSampler)
    with pytest.raises(ConfigError, match="hydra.sweeper.sampler='tps'"):
        hpo.make_sampler("tps", {}, 0)
    assert isinstance(hpo.make_pruner("none", {}, 8), optuna.pruners.NopPruner)
    median = hpo.make_pruner("median", {"n_startup_trials": 2, "n_warmup_steps": 1}, 8)
    assert isinstance(median, optuna.pruners.MedianPruner)
    hyperband = hpo.make_pruner("hyperband", {"n_startup_trials": 2}, 8)
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)
    with pytest.raises(ConfigError, match=r"pruner_options.n_warmup_step: no Optuna pruner"):
        hpo.make_pruner("median", {"n_warmup_step": 1}, 8)  # a typo is not silently dropped
    with pytest.raises(ConfigError, match="hydra.sweeper.pruner='mediann'"):
        hpo.make_pruner("mediann", {}, 8)


def test_the_monitored_metric_maps_val_to_the_logged_key():
    record = {"epoch": 2, "test/acc1": 0.8, "train/loss": 1.0}
    assert hpo.monitored_value("val/acc1", {"val/acc1": 0.7, **record}, True) == 0.7
    assert hpo.monitored_value("val/acc1", record, has_validation=True) is None  # never test/*
    assert hpo.monitored_value("test/acc1", record, has_validation=False) == 0.8
    assert hpo.monitored_value("test/nll", record, has_validation=False) is None
    with pytest.raises(ConfigError, match=r"needs a validation split: set dataset.val_fraction"):
        hpo.monitored_value("val/acc1", record, has_validation=False)
    with pytest.raises(ConfigError, match=r"would tune on the test set .*metric=val/acc1"):
        hpo.monitored_value("test/acc1", record, has_validation=True)


def test_prepare_resume_counts_only_trials_that_ended_on_their_own(tmp_path):
    storage = hpo.open_storage(str(tmp_path / "study.journal"))
    study = optuna.create_study(study_name="s", storage=storage)
    done = study.ask()
    done.suggest_float("lr", 0.01, 0.1)
    study.tell(done, 1.0)
    crashed = study.ask()
    crashed.suggest_float("lr", 0.01, 0.1)
    study.tell(crashed, state=TrialState.FAIL)
    killed = study.ask()  # left RUNNING, as by a killed sweep
    lr = killed.suggest_float("lr", 0.01, 0.1)

    assert hpo.prepare_resume(study, 5) == 3  # the completed and the crashed trial count
    assert [t.state for t in study.trials] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.FAIL,
        TrialState.WAITING,  # the killed trial's parameters, queued again
    ]
    assert study.user_attrs[hpo.INTERRUPTED_ATTR] == [2]
    # the queued trial is the next one asked, with the killed trial's parameters
    again = study.ask(fixed_distributions={"lr": FloatDistribution(0.01, 0.1)})
    assert again.number == 3 and again.params == {"lr": lr}
    study.tell(again, state=TrialState.PRUNED)
    assert hpo.prepare_resume(study, 5) == 2  # a pruned trial counts as done
    assert hpo.prepare_resume(study, 1) == 0


def test_a_second_sweep_of_the_same_study_is_refused(tmp_path):
    journal = str(tmp_path / "s.journal")
    with sweep_lock(journal, "s"):
        with pytest.raises(ConfigError, match="being searched by another sweep"):
            with sweep_lock(journal, "s"):
                pass
        with sweep_lock(journal, "other"):  # another study of the same file is free
            pass
    with sweep_lock(journal, "s"):  # released
        pass


def test_plugin_discovery_does_not_import_optuna():
    code = (
        "import sys; from hydra.core.plugins import Plugins; "
        "from hydra.plugins.sweeper import Sweeper; "
        "names = [p.__name__ for p in Plugins.instance().discover(Sweeper)]; "
        "assert 'KdrunOptunaSweeper' in names, names; "
        "assert 'optuna' not in sys.modules, 'optuna imported by plugin discovery'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _worker(journal: str, n: int, queue) -> None:
    try:
        storage = hpo.open_storage(journal)
        study = optuna.load_study(study_name="shared", storage=storage)
        for _ in range(n):
            trial = study.ask({"x": FloatDistribution(0.0, 1.0)})
            for step in range(3):
                trial.report(trial.params["x"] * step, step)
            study.tell(trial, trial.params["x"])
        queue.put("ok")
    except Exception as exc:  # reported to the test
        queue.put(repr(exc))


def test_two_processes_share_one_journal_file_without_lost_trials(tmp_path):
    journal = str(tmp_path / "shared.journal")
    optuna.create_study(study_name="shared", storage=hpo.open_storage(journal))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(journal, 15, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results == ["ok", "ok"]
    trials = optuna.load_study(study_name="shared", storage=hpo.open_storage(journal)).trials
    assert len(trials) == 30
    assert sorted(t.number for t in trials) == list(range(30))  # no number given twice
    assert all(t.state == TrialState.COMPLETE and len(t.intermediate_values) == 3 for t in trials)
