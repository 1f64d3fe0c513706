from clrun.cli import main

main()
