"""editors/jetbrains: the LSP4IJ template and the plugin's registration, checked without an IDE.

The fields are the ones LSP4IJ reads when it imports a template folder (its
LanguageServerTemplateManager and ServerTemplateJsonDeserializer): template.json with `name`,
`programArgs` (per OS), `fileTypeMappings` (`fileType.patterns` or `fileType.name`, plus
`languageId`) and `languageMappings`; initializationOptions.json; an optional README.md.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

from codelm.lsp.settings import LspSettings, settings_from_options

JETBRAINS = Path(__file__).resolve().parents[2] / "editors" / "jetbrains"
TEMPLATE = JETBRAINS / "template"
PLUGIN = JETBRAINS / "plugin"
LSP4IJ_FILES = {
    "template.json", "settings.json", "settings.schema.json", "initializationOptions.json",
    "experimental.json", "clientSettings.json", "installer.json", "workspaceFolderSettings.json",
    "README.md",
}  # fmt: skip
TEMPLATE_KEYS = {
    "id", "name", "url", "programArgs", "workingDir", "env", "fileTypeMappings",
    "languageMappings", "expandConfiguration", "disablePromotionFor", "dev",
}  # fmt: skip
OS_KEYS = {"default", "windows", "mac", "unix"}
COMMON_LANGUAGES = {"python", "javascript", "typescript", "java", "go", "rust", "c", "cpp"}


def _template() -> dict:
    return json.loads((TEMPLATE / "template.json").read_text(encoding="utf-8"))


def _pattern_mappings(template: dict) -> dict[str, list[str]]:
    return {m["languageId"]: m["fileType"]["patterns"] for m in template["fileTypeMappings"]}


def test_jetbrains_template_folder_holds_only_files_lsp4ij_imports():
    names = {p.name for p in TEMPLATE.iterdir()}
    assert "template.json" in names
    assert names <= LSP4IJ_FILES, names - LSP4IJ_FILES


def test_jetbrains_template_starts_codelm_lsp_on_stdio():
    template = _template()
    assert set(template) <= TEMPLATE_KEYS, set(template) - TEMPLATE_KEYS
    assert isinstance(template["name"], str) and template["name"]
    args = template["programArgs"]
    assert "default" in args and set(args) <= OS_KEYS
    for command in args.values():
        program, *rest = shlex.split(command)
        assert Path(program).stem == "codelm-lsp" and rest == ["--stdio"]


def test_jetbrains_template_maps_common_languages_by_file_pattern():
    mappings = _template()["fileTypeMappings"]
    for mapping in mappings:
        assert set(mapping) == {"fileType", "languageId"}
        assert set(mapping["fileType"]) == {"patterns"}
        assert all(re.fullmatch(r"\*\.[a-z+]+", p) for p in mapping["fileType"]["patterns"])
    by_language = _pattern_mappings(_template())
    assert len(by_language) == len(mappings)  # one entry per language id
    patterns = [p for ps in by_language.values() for p in ps]
    assert len(patterns) == len(set(patterns))  # a file goes to one language id
    assert set(by_language) >= COMMON_LANGUAGES


def test_jetbrains_initialization_options_are_the_server_defaults(caplog):
    options = json.loads((TEMPLATE / "initializationOptions.json").read_text(encoding="utf-8"))
    with caplog.at_level(logging.DEBUG, logger="codelm.lsp.settings"):
        settings, problems = settings_from_options(options)
    assert problems == []
    assert "unknown option" not in caplog.text
    assert settings == LspSettings()


def test_jetbrains_plugin_registers_the_same_mappings_as_the_template():
    root = ET.parse(PLUGIN / "src/main/resources/META-INF/plugin.xml").getroot()
    assert "com.redhat.devtools.lsp4ij" in [d.text for d in root.iter("depends")]
    (server,) = root.iter("server")
    factory = server.get("factoryClass", "")
    source = PLUGIN / "src/main/kotlin" / (factory.replace(".", "/") + ".kt")
    assert source.exists(), f"{factory} has no source file"
    mappings = {
        m.get("languageId"): m.get("patterns", "").split(";")
        for m in root.iter("fileNamePatternMapping")
        if m.get("serverId") == server.get("id")
    }
    assert mappings == _pattern_mappings(_template())
    gradle = (PLUGIN / "build.gradle.kts").read_text(encoding="utf-8")
    assert 'plugin("com.redhat.devtools.lsp4ij:' in gradle
