"""ray_env.gpus_requested on the session's local Ray, which has no GPU and no autoscaler."""

import pytest

from cxr_batch.errors import InputError
from cxr_batch.jobs.ray_env import gpus_requested


def test_no_gpus_wanted_means_no_request_and_no_wait(ray_session):
    with gpus_requested(0, timeout_s=0):
        pass


def test_gpus_that_never_come_fail_with_a_message_saying_what_to_check(ray_session):
    with pytest.raises(InputError, match=r"Asked the autoscaler for 1 GPUs, but the cluster has 0 after 1 s.*ray status"):
        with gpus_requested(1, timeout_s=1, echo=lambda m: None):
            pytest.fail("entered without the GPU")
