rootProject.name = "codelm-jetbrains"
