from edge_magistral.cli import main

main()
