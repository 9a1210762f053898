"""`megacluster plan`: a digital twin of AI supercomputers (pure numpy; never imports torch)."""
