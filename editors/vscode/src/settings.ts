// VS Code `codelm.*` settings -> codelm-lsp options (camelCase, lsp/settings.py), kept pure for tests.

export const SECTION = 'codelm';

/** What `vscode.WorkspaceConfiguration` offers; tests pass a plain object. */
export interface ConfigReader {
  get<T>(key: string): T | undefined;
}

/** The server's options. `null` resets an option to the server's default (lsp/settings.py). */
export interface ServerOptions {
  enabled: boolean;
  model: string | null;
  maxTokens: number;
  maxTimeMs: number;
  singleLine: string;
  debounceMs: number;
  timeoutMs: number;
  enabledLanguages: string[];
  disabledLanguages: string[];
  contextFiles: number;
  warmup: boolean;
  warmupFromHighlights: boolean;
  daemon: { url: string | null; autoStart: boolean };
}

export interface LanguageLists {
  enabledLanguages: string[];
  disabledLanguages: string[];
}

/** Maps the settings; empty strings become null (the server rejects empty strings). */
export function serverOptions(config: ConfigReader): ServerOptions {
  return {
    enabled: config.get<boolean>('enable') ?? true,
    model: nonEmpty(config.get<string>('model')),
    maxTokens: config.get<number>('maxTokens') ?? 64,
    maxTimeMs: config.get<number>('maxTimeMs') ?? 0,
    singleLine: config.get<string>('singleLine') ?? 'auto',
    debounceMs: config.get<number>('debounceMs') ?? 75,
    timeoutMs: config.get<number>('timeoutMs') ?? 10000,
    enabledLanguages: config.get<string[]>('enabledLanguages') ?? [],
    disabledLanguages: config.get<string[]>('disabledLanguages') ?? [],
    contextFiles: config.get<number>('contextFiles') ?? 3,
    warmup: config.get<boolean>('warmup') ?? true,
    // This extension says where the cursor rests itself (codelm/didFocus): highlight
    // requests at every cursor move would say it again.
    warmupFromHighlights: false,
    daemon: {
      url: nonEmpty(config.get<string>('daemon.url')),
      autoStart: config.get<boolean>('daemon.autoStart') ?? true,
    },
  };
}

/** The server's rule (LspSettings.is_language_enabled), for menu labels only. */
export function isLanguageEnabled(lists: LanguageLists, language: string): boolean {
  const lang = language.toLowerCase();
  const enabled = lists.enabledLanguages.map((l) => l.toLowerCase());
  if (lists.disabledLanguages.some((l) => l.toLowerCase() === lang)) {
    return false;
  }
  return enabled.length === 0 || enabled.includes(lang);
}

/** The lists after switching `language` off (added to disabled) or back on. */
export function toggleLanguage(lists: LanguageLists, language: string): LanguageLists {
  const lang = language.toLowerCase();
  const others = (list: string[]) => list.filter((l) => l.toLowerCase() !== lang);
  if (isLanguageEnabled(lists, lang)) {
    return { ...lists, disabledLanguages: [...others(lists.disabledLanguages), lang] };
  }
  const enabled = lists.enabledLanguages;
  return {
    enabledLanguages: enabled.length === 0 ? enabled : [...others(enabled), lang],
    disabledLanguages: others(lists.disabledLanguages),
  };
}

function nonEmpty(value: string | undefined): string | null {
  const trimmed = value?.trim();
  return trimmed ? trimmed : null;
}
