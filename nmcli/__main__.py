from nmcli.cli import main

main()
