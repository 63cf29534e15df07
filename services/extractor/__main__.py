from services.extractor.server import main

main()
