import io
import time

from kdistill.train import Progress


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_off_a_terminal_and_nothing_when_quiet():
    stream = io.StringIO()
    progress = Progress("auto", stream=stream)
    assert progress.mode == "lines"
    assert list(progress.batches(range(3), 3, "epoch 1")) == [0, 1, 2]
    progress.update(loss=0.5)
    progress.line("[student] epoch 1/1 loss 0.5")
    assert stream.getvalue() == "[student] epoch 1/1 loss 0.5\n"

    quiet = io.StringIO()
    progress = Progress("quiet", stream=quiet)
    list(progress.batches(range(3), 3, "epoch 1"))
    progress.line("anything")
    assert quiet.getvalue() == ""


def test_a_bar_with_loss_and_accuracy_on_a_terminal():
    terminal = FakeTerminal()
    progress = Progress("auto", stream=terminal)
    assert progress.mode == "bar"
    for _ in progress.batches(range(4), 4, "student 1/2"):
        progress.update(loss=0.25, acc=0.9)
        time.sleep(0.12)  # tqdm redraws at most every 0.1 s
    assert "student 1/2" in terminal.getvalue() and "loss=0.25" in terminal.getvalue()
