// Exists so kmodmon's build script can depend on this package (and be rebuilt when it changes);
// the programs themselves are in the `kmodmon` binary target.
#![no_std]
