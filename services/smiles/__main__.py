from services.smiles.server import main

main()
