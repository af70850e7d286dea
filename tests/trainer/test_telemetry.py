"""Trainer telemetry: real HTTP scrapes of the Prometheus endpoint on loopback."""

import math
import socket
import time
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from common.metrics import start_metrics_server
from features.schema import load_schema
from trainer.telemetry import TrainerTelemetry

TASKS = load_schema("feed").label_columns


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port):
    """``{(sample name, labels): value}`` from a real GET of /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode("utf-8")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.fixture
def telemetry():
    served = TrainerTelemetry(TASKS, port=free_port())
    yield served
    served.close()


def test_recorded_values_appear_in_a_scrape(telemetry):
    before = scrape(telemetry.server.port)
    assert math.isnan(before[("sirenfeed_trainer_eval_ne", (("task", "like"),))])
    assert math.isnan(before[("sirenfeed_trainer_siren_lambda", ())])

    telemetry.on_step(step=42, loss=0.53, samples_per_s=1234.5, tokens_per_s=61725.0, data_wait=0.125,
                      lam=0.875)
    telemetry.on_eval({task: {"ne": 0.9 + index / 100, "auc": 0.7 - index / 100}
                       for index, task in enumerate(TASKS)})
    checkpoint_time = time.time()
    telemetry.on_checkpoint(step=40)
    samples = scrape(telemetry.server.port)

    assert samples[("sirenfeed_trainer_step", ())] == 42
    assert samples[("sirenfeed_trainer_loss", ())] == 0.53
    assert samples[("sirenfeed_trainer_samples_per_second", ())] == 1234.5
    assert samples[("sirenfeed_trainer_tokens_per_second", ())] == 61725.0
    assert samples[("sirenfeed_trainer_data_wait_fraction", ())] == 0.125
    assert samples[("sirenfeed_trainer_siren_lambda", ())] == 0.875
    for index, task in enumerate(TASKS):
        labels = (("task", task),)
        assert samples[("sirenfeed_trainer_eval_ne", labels)] == pytest.approx(0.9 + index / 100)
        assert samples[("sirenfeed_trainer_eval_auc", labels)] == pytest.approx(0.7 - index / 100)
    assert samples[("sirenfeed_trainer_last_checkpoint_step", ())] == 40
    assert abs(samples[("sirenfeed_trainer_last_checkpoint_timestamp_seconds", ())] - checkpoint_time) < 5

    telemetry.on_step(step=43, loss=0.5, samples_per_s=1.0, tokens_per_s=1.0, data_wait=0.0, lam=None)
    assert math.isnan(scrape(telemetry.server.port)[("sirenfeed_trainer_siren_lambda", ())])


def test_instances_have_separate_registries(telemetry):
    other = TrainerTelemetry(TASKS, port=0)
    other.on_step(step=7, loss=1.0, samples_per_s=1.0, tokens_per_s=1.0, data_wait=0.5, lam=1.0)
    telemetry.on_step(step=9, loss=2.0, samples_per_s=1.0, tokens_per_s=1.0, data_wait=0.5, lam=1.0)
    assert scrape(telemetry.server.port)[("sirenfeed_trainer_step", ())] == 9
    assert other.registry.get_sample_value("sirenfeed_trainer_step") == 7
    assert REGISTRY.get_sample_value("sirenfeed_trainer_step") is None  # the global registry stays clean


def test_port_zero_starts_nothing():
    telemetry = TrainerTelemetry(TASKS, port=0)
    assert telemetry.server is None
    assert start_metrics_server(0, registry=telemetry.registry) is None
    telemetry.on_checkpoint(step=1)  # recording still works without a server
    assert telemetry.registry.get_sample_value("sirenfeed_trainer_last_checkpoint_step") == 1
    telemetry.close()


def test_close_frees_the_port():
    port = free_port()
    TrainerTelemetry(TASKS, port=port).close()
    reopened = TrainerTelemetry(TASKS, port=port)
    assert scrape(port)[("sirenfeed_trainer_step", ())] == 0
    reopened.close()


def test_bad_port_is_rejected():
    with pytest.raises(ValueError, match="port"):
        TrainerTelemetry(TASKS, port=70000)
