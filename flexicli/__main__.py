from flexicli.cli import main

main()
