"""The `nmsparse` command (and `python -m nmcli`): OpenMP's spin is set before the CLI imports torch."""

from nmcli.runtime.openmp import spin_briefly


def main() -> None:
    spin_briefly()
    from nmcli.cli import main as run

    run()


if __name__ == "__main__":
    main()
