package dev.codelm.jetbrains

import com.intellij.execution.configurations.GeneralCommandLine
import com.intellij.execution.configurations.PathEnvironmentVariableUtil
import com.intellij.openapi.project.Project
import com.intellij.openapi.util.SystemInfo
import com.redhat.devtools.lsp4ij.server.OSProcessStreamConnectionProvider
import java.io.File

/**
 * Starts `codelm-lsp --stdio`: the file the CODELM_LSP environment variable names, else the
 * project's `.venv` (as the VS Code extension does), else `codelm-lsp` on PATH. Settings are
 * the server's defaults (docs/lsp.md).
 */
class CodelmLanguageServer(project: Project) : OSProcessStreamConnectionProvider() {
    init {
        commandLine = GeneralCommandLine(serverPath(project), "--stdio")
            .withParentEnvironmentType(GeneralCommandLine.ParentEnvironmentType.CONSOLE)
    }

    private fun serverPath(project: Project): String {
        val name = if (SystemInfo.isWindows) "codelm-lsp.exe" else "codelm-lsp"
        val bin = if (SystemInfo.isWindows) "Scripts" else "bin"
        val configured = System.getenv("CODELM_LSP")?.takeIf { it.isNotBlank() }?.let { File(it) }
        val venv = project.basePath?.let { File(it, ".venv/$bin/$name") }
        return when {
            configured != null && configured.canExecute() -> configured.path
            venv != null && venv.canExecute() -> venv.path
            else -> PathEnvironmentVariableUtil.findInPath(name)?.path ?: name
        }
    }
}
