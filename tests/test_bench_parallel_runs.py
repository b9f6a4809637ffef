"""bench.bench_parallel_runs refuses what it cannot measure, naming the option."""
import pytest

from bench.bench_parallel_runs import main


@pytest.mark.parametrize("argv, message", [(["--models", "vae,unet"], "--models"), (["--models", ""], "--models"),
                                           (["--threads", "1"], "--threads")])
def test_bad_arguments_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
