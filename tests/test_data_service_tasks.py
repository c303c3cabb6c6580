"""The driver's one task loop (data_service.tasks.run_tasks) and the storage mode each stage's tasks follow."""
import bz2
import logging
import sys
import time

import pytest
import ray

from data_service.config import PipelineConfig
from data_service.pipeline import RunResult
from data_service.ray_session import TaskWindow
from data_service.readers import iter_chunks
from data_service.storage import DriverStorage, SharedStorage, storage_mode
from data_service.tasks import Task, run_tasks

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ray_up():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def square_after(x, seconds):
    time.sleep(seconds)
    return x * x


def fail_on(x, bad):
    if x == bad:
        raise ValueError(f"item {x} is bad")
    return x


def test_the_loop_keeps_at_most_the_limit_in_flight_and_hands_back_every_answer_with_its_key(ray_up, tmp_path):
    result = RunResult(tmp_path, {}, {})
    built, answers, in_flight = [], {}, []

    def make_task(x):
        built.append(x)
        in_flight.append(len(built) - len(answers))  # this task included
        return Task(("key", x), square_after, (x, 0.05))

    run_tasks(range(10), lambda: TaskWindow(3, result), make_task, lambda key, value: answers.update({key: value}))
    assert answers == {("key", x): x * x for x in range(10)}
    assert built == list(range(10)) and max(in_flight) == 3 and result.max_in_flight == 3


def test_answers_are_handed_back_as_tasks_finish_not_in_submission_order(ray_up, tmp_path):
    order = []
    run_tasks([(0, 3.0), (1, 0.0), (2, 0.0)], lambda: TaskWindow(3, RunResult(tmp_path, {}, {})),
              lambda item: Task(item[0], square_after, item), lambda key, value: order.append(key))
    assert sorted(order) == [0, 1, 2] and order[-1] == 0  # the slow first task did not hold the others back


def test_a_failing_task_stops_the_loop_after_every_earlier_answer_was_handed_back(ray_up, tmp_path):
    """One task at a time: items 0-4 are finished (stored, in the pipeline) before 5 fails; 6 is read (the loop
    looks at the next item before it waits for a slot) but never submitted, 7 is never read."""
    finished, read, built = [], [], []

    def todo():
        for x in range(8):
            read.append(x)
            yield x

    def make_task(x):
        built.append(x)
        return Task(x, fail_on, (x, 5))

    with pytest.raises(ValueError, match="item 5 is bad"):
        run_tasks(todo(), lambda: TaskWindow(1, RunResult(tmp_path, {}, {})), make_task,
                  lambda key, value: finished.append(key))
    assert finished == [0, 1, 2, 3, 4] and built == [0, 1, 2, 3, 4, 5] and read == [0, 1, 2, 3, 4, 5, 6]


def test_a_stage_with_nothing_to_do_opens_no_window_so_starts_no_ray():
    opened = []
    run_tasks(iter(()), lambda: opened.append("window"), lambda item: pytest.fail("no task to build"),
              lambda key, value: pytest.fail("no answer"))
    assert opened == []


def test_shared_storage_sends_a_byte_range_unless_the_input_is_compressed_and_the_driver_mode_sends_bytes(tmp_path):
    plain, packed = tmp_path / "a.txt", tmp_path / "b.txt.bz2"
    plain.write_text("今天天气很好我们一起去公园\n", encoding="utf-8")
    packed.write_bytes(bz2.compress(plain.read_bytes()))
    config = PipelineConfig(inputs=(str(plain),), output=str(tmp_path / "out"))
    shared = storage_mode(True, config, tmp_path / "out", tmp_path / "out" / "_work", "job")
    driver = storage_mode(False, config, tmp_path / "out", tmp_path / "out" / "_work", "job")
    assert isinstance(shared, SharedStorage) and shared.shared and isinstance(driver, DriverStorage) and not driver.shared
    for index, path in enumerate((plain, packed)):
        (chunk,) = iter_chunks(path, index, "text", None, "lines", 1 << 20)
        sent_by_worker = shared.chunk_task((index, 0), chunk)
        assert sent_by_worker.key == ((index, 0), str(path))
        assert (sent_by_worker.args[0].data is None) == (path == plain)  # a compressed input cannot be read mid-file
        assert driver.chunk_task((index, 0), chunk).args[0].data == chunk.data
