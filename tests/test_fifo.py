"""webhook.fifo.FifoRunner: arrival order, the loop gets a turn every ``per_poll`` functions, errors and
cancellations reach only their own caller."""

from __future__ import annotations

import asyncio

import pytest

from webhook.fifo import FifoRunner


def _run(coro):
    return asyncio.run(coro)


def test_functions_run_in_the_order_they_were_submitted_and_each_caller_gets_its_own_result():
    async def main():
        runner = FifoRunner(asyncio.get_running_loop(), per_poll=3)
        ran: list[int] = []

        def job(i: int):
            def fn():
                ran.append(i)
                return i * i
            return fn

        results = await asyncio.gather(*(runner.run(job(i)) for i in range(10)))
        return ran, results

    ran, results = _run(main())
    assert ran == list(range(10))
    assert results == [i * i for i in range(10)]


@pytest.mark.parametrize("per_poll", [1, 2, 4])
def test_the_loop_gets_a_turn_after_every_per_poll_functions(per_poll):
    """What keeps the tail short: between two turns of any other task, at most ``per_poll`` functions run."""

    async def main():
        runner = FifoRunner(asyncio.get_running_loop(), per_poll=per_poll)
        log: list[str] = []
        stop = False

        async def other_task():  # stands for the loop's socket reads: it runs once per loop iteration
            while not stop:
                log.append("turn")
                await asyncio.sleep(0)

        ticker = asyncio.create_task(other_task())
        await asyncio.sleep(0)
        await asyncio.gather(*(runner.run(lambda i=i: log.append(f"f{i}")) for i in range(12)))
        stop = True
        await ticker
        return log

    log = _run(main())
    runs, current = [], 0
    for entry in log:
        if entry == "turn":
            if current:
                runs.append(current)
            current = 0
        else:
            current += 1
    runs.append(current)
    assert [e for e in log if e != "turn"] == [f"f{i}" for i in range(12)]
    assert [r for r in runs if r] == [per_poll] * (12 // per_poll)


def test_an_error_reaches_its_caller_only_and_the_queue_goes_on():
    async def main():
        runner = FifoRunner(asyncio.get_running_loop(), per_poll=1)

        def boom():
            raise ValueError("bad review")

        return await asyncio.gather(runner.run(lambda: 1), runner.run(boom), runner.run(lambda: 3), return_exceptions=True)

    first, error, third = _run(main())
    assert (first, third) == (1, 3)
    assert isinstance(error, ValueError) and str(error) == "bad review"


def test_a_cancelled_caller_s_function_is_not_run():
    async def main():
        runner = FifoRunner(asyncio.get_running_loop(), per_poll=1)
        ran: list[str] = []
        keep = asyncio.ensure_future(runner.run(lambda: ran.append("kept")))
        gone = asyncio.ensure_future(runner.run(lambda: ran.append("cancelled")))
        last = asyncio.ensure_future(runner.run(lambda: ran.append("last")))
        await asyncio.sleep(0)  # all three queued
        gone.cancel()
        await asyncio.gather(keep, last)
        with pytest.raises(asyncio.CancelledError):
            await gone
        return ran

    assert _run(main()) == ["kept", "last"]


def test_the_runner_starts_again_after_its_queue_ran_dry():
    async def main():
        runner = FifoRunner(asyncio.get_running_loop())
        first = await runner.run(lambda: "first")
        await asyncio.sleep(0.01)  # the worker has finished and exited
        second = await runner.run(lambda: "second")
        return first, second

    assert _run(main()) == ("first", "second")


def test_callers_still_queued_when_the_worker_is_cancelled_are_cancelled_too():
    """At shutdown the loop cancels the worker: the reviews behind it must not wait for ever."""

    async def main():
        runner = FifoRunner(asyncio.get_running_loop(), per_poll=1)
        calls = [asyncio.ensure_future(runner.run(lambda i=i: i)) for i in range(3)]
        await asyncio.sleep(0)  # queued, the worker started
        await asyncio.sleep(0)  # the first ran; the worker yielded
        runner._worker.cancel()
        results = await asyncio.gather(*calls, return_exceptions=True)
        return results

    results = _run(main())
    assert results[0] == 0
    assert all(isinstance(r, asyncio.CancelledError) for r in results[1:]), results
