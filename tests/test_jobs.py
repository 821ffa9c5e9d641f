"""Every shipped job file loads, validates against the schema, and builds its data set and model."""

import pytest

from dtrain.config import load_job, to_objects
from dtrain.data import load_data
from dtrain.models import build_model
from tests.helpers import JOBS

JOB_FILES = sorted(JOBS.glob("*.yaml"))


def test_there_is_a_job_per_catalog_model():
    from dtrain.models import MODELS

    used = {load_job(path).model.name for path in JOB_FILES}
    assert set(MODELS) <= used, f"models without a job file: {set(MODELS) - used}"


@pytest.mark.parametrize("path", JOB_FILES, ids=[p.stem for p in JOB_FILES])
def test_job_file_builds(path):
    job = to_objects(load_job(path))
    data = load_data(job.data)
    model = build_model(job.model, data.meta)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert len(data.train[0]) > 0 and len(data.test[0]) > 0
