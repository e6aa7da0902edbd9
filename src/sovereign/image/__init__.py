"""Node images: the recipe and its cache (`recipe`), the GPT disk (`disk`), the build
(`build`), booting under QEMU with swtpm and canaries (`boot`), and the first-boot roles
(`provision`, `node`)."""
