"""The scoring driver's pure parts: how the actor pool is sized (end to end: test_score_e2e.py)."""

from cxr_batch.jobs.score import ScoreSettings, plan_resources


def test_two_cpu_plan_gives_torch_both_cpus_and_still_fits():
    plan = plan_resources(2, 0, ScoreSettings(archive=".", out="o"))
    assert plan.actors == 1 and plan.torch_threads == 2
    assert plan.actors * plan.cpus_per_actor + 2 * plan.task_cpus <= 2  # or Ray Data waits forever
    explicit = plan_resources(2, 0, ScoreSettings(archive=".", out="o", cpus_per_actor=1))
    assert explicit.torch_threads == 1  # an explicit --cpus-per-actor is taken at its word
    big = plan_resources(16, 0, ScoreSettings(archive=".", out="o"))
    assert big.torch_threads == 4 and big.actors == 3
