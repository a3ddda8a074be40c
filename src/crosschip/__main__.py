from crosschip.cli import main

# Guarded: a spawned helper process (the ONNX export's second trace) imports the parent's
# __main__ module, and must not run the CLI again.
if __name__ == "__main__":
    raise SystemExit(main())
