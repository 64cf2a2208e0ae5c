from mailsnap.cli import main

main()
