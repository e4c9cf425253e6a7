package dev.codelm.jetbrains

import com.intellij.openapi.project.Project
import com.redhat.devtools.lsp4ij.LanguageServerFactory
import com.redhat.devtools.lsp4ij.server.StreamConnectionProvider

/** LSP4IJ's entry point (plugin.xml `server`): one codelm-lsp process per project. */
class CodelmLanguageServerFactory : LanguageServerFactory {
    override fun createConnectionProvider(project: Project): StreamConnectionProvider =
        CodelmLanguageServer(project)
}
