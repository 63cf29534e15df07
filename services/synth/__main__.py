from services.synth.server import main

main()
