import logging

import pytest

from rlhf import launch


@pytest.fixture
def machine(monkeypatch):
    def set_machine(threads: int, cores: int, omp: str | None = "1"):
        monkeypatch.setattr(launch.torch, "get_num_threads", lambda: threads)
        monkeypatch.setattr(launch, "available_cores", lambda: cores)
        if omp is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", omp)

    return set_machine


def test_one_thread_on_a_two_core_cpu_run_is_named_with_the_fix(machine):
    machine(threads=1, cores=2)
    warning = launch.cpu_thread_warning(on_cpu=True)
    assert "1 thread(s)" in warning and "2-core" in warning and "OMP_NUM_THREADS=1" in warning
    assert "--cpu" in warning and "configs/accelerate/cpu.yaml" in warning


@pytest.mark.parametrize(
    "threads, cores, processes, on_cpu",
    [(2, 2, 1, True), (1, 2, 2, True), (1, 1, 1, True), (1, 16, 1, False)],
)
def test_no_warning_when_the_cores_are_used_or_the_run_is_not_on_cpu(
    machine, threads, cores, processes, on_cpu
):
    machine(threads=threads, cores=cores)
    assert launch.cpu_thread_warning(on_cpu, processes) is None


def test_the_stage_logs_the_warning_with_the_launch_world(machine, monkeypatch, caplog):
    machine(threads=1, cores=4, omp=None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with caplog.at_level(logging.WARNING):
        launch.warn_about_cpu_threads(on_cpu=True)
    assert "in each of 2 process(es) on a 4-core machine (OMP_NUM_THREADS=unset)" in caplog.text
    caplog.clear()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    launch.warn_about_cpu_threads(on_cpu=True)
    assert caplog.text == ""
