from gspo_engine.cli import main

main()
